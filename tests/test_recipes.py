"""Every recipe and accelerate config under recipes/ parses and validates; flags override YAML."""

from pathlib import Path

import pytest
import yaml

from imm_trl.config import IMMConfig
from imm_trl.loop import apply_overrides, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes/accelerate_configs").glob("*.yaml"))


def test_the_recipes_the_issue_names_exist():
    assert {p.stem for p in RECIPES} >= {"default", "paper", "lora_1b5", "qlora_8b", "zero3_vllm_7b"}
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"single", "ddp", "ddp_cpu", "zero2", "zero3", "fsdp2"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_validates(path):
    from peft import LoraConfig

    recipe = load_recipe(path)
    imm = IMMConfig.from_dict(recipe.imm)
    assert imm.iterations >= 1
    if recipe.peft is not None:
        assert LoraConfig(**recipe.peft).r > 0
    from trl import SFTConfig

    args = SFTConfig(**{**recipe.sft, "bf16": False, "use_cpu": True})  # this machine has no GPU
    assert args.output_dir


def test_the_paper_recipe_is_the_papers_setup():
    recipe = load_recipe(RECIPES[[p.stem for p in RECIPES].index("paper")])
    imm = IMMConfig.from_dict(recipe.imm)
    assert recipe.model.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and recipe.peft is None
    assert (imm.merge_method, imm.density, imm.merge_ratio, imm.iterations) == ("dare_linear", 0.8, 0.5, 3)
    assert (imm.samples_per_question, imm.temperature) == (3, 0.0)
    sft = recipe.sft
    assert sft["learning_rate"] == 2e-5 and sft["num_train_epochs"] == 3 and sft["warmup_steps"] == 0.03
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == 64


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"


def test_flags_override_the_yaml_and_are_parsed_as_yaml():
    raw = {"imm": {"iterations": 3}, "sft": {"output_dir": "x"}}
    out = apply_overrides(raw, ["--imm.iterations", "2", "--sft.learning_rate", "1e-5", "--peft.r", "8"])
    assert out == {"imm": {"iterations": 2}, "sft": {"output_dir": "x", "learning_rate": 1e-5}, "peft": {"r": 8}}
    assert raw["imm"]["iterations"] == 3  # the loaded recipe is left as it was


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"imm": {"iteratons": 2}}, "unknown key.*iteratons"),
        ({"sft": {"learnig_rate": 1e-5}}, "unknown key.*learnig_rate"),
        ({"modle": {}}, "unknown key.*modle"),
        ({"model": {"load_in_4bit": True}}, "adapter"),
        ({"imm": {"merge_method": "avg"}}, "avg"),
    ],
)
def test_typos_and_impossible_settings_are_clear_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(raw)


def test_malformed_override_flag_names_the_form(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"imm": {"iterations": 1}}))
    with pytest.raises(ValueError, match="--<section>.<key>"):
        load_recipe(path, ["--iterations", "2"])


def test_a_sampler_setting_typo_is_caught_before_loading_anything():
    with pytest.raises(ValueError, match="kv_cache.*valid"):
        parse_recipe({"imm": {"sampler": "vllm", "sampler_kwargs": {"kv_cache": 2}}})


def test_packaged_recipes_are_the_repository_recipes_and_load_by_name():
    from imm_trl.recipes import RECIPES_DIR, read_recipe, recipe_names, recipe_path

    assert recipe_names() == [p.stem for p in RECIPES]
    for path in RECIPES:
        assert recipe_path(path.stem) == RECIPES_DIR / path.name
        assert read_recipe(path.stem) == yaml.safe_load(path.read_text())
    assert recipe_path(RECIPES[0]) == RECIPES[0]  # a path stays a path
    assert load_recipe("default") == load_recipe(RECIPES_DIR / "default.yaml")
    with pytest.raises(FileNotFoundError, match="no packaged recipe named 'nope'; packaged recipes: default"):
        recipe_path("nope")


def test_run_config_default_resolves_to_the_packaged_recipe(monkeypatch, tmp_path):
    import argparse

    from imm_trl import loop

    seen = {}
    monkeypatch.chdir(tmp_path)  # outside the checkout: no recipes/ here
    monkeypatch.setattr(loop, "run_imm", lambda config, overrides: seen.update(
        recipe=loop.load_recipe(config, overrides)) or argparse.Namespace(history=[]))
    parser = argparse.ArgumentParser()
    loop.add_run_parser(parser.add_subparsers())
    args = parser.parse_args(["run", "--config", "default"])
    args.overrides = ["--imm.iterations", "2"]
    assert args.func(args) == 0
    assert seen["recipe"].imm["iterations"] == 2 and seen["recipe"].model.model_name_or_path == "default"


# -- the model section is trl.ModelConfig ------------------------------------------------------


def test_model_section_is_trls_model_config_with_the_offline_default():
    from trl import ModelConfig

    model = parse_recipe({"model": {"dtype": "bfloat16", "attn_implementation": "sdpa"}}).model
    assert isinstance(model, ModelConfig)
    assert (model.model_name_or_path, model.dtype, model.attn_implementation) == ("default", "bfloat16", "sdpa")


def test_model_name_or_path_keeps_its_old_name():
    model = parse_recipe({"model": {"name_or_path": "some/model"}}).model
    assert model.model_name_or_path == "some/model"
    with pytest.raises(ValueError, match="give model_name_or_path only"):
        parse_recipe({"model": {"name_or_path": "a", "model_name_or_path": "b"}})


def test_trl_style_adapter_from_model_use_peft():
    from imm_trl.loop import peft_config

    recipe = parse_recipe({"model": {"use_peft": True, "lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"], "load_in_4bit": True}})
    adapter = peft_config(recipe)
    assert (adapter.r, adapter.target_modules, adapter.lora_alpha) == (8, {"q_proj", "v_proj"}, 32)
    assert peft_config(parse_recipe({})) is None  # no adapter: full fine-tuning
    assert peft_config(parse_recipe({"peft": {"r": 4}})).r == 4


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"use_peft": True}, "peft": {"r": 4}}, "adapter twice"),
        ({"model": {"lora_r": 8}}, r"\['lora_r'\] are read only with model.use_peft: true"),
        ({"model": {"model_name_or_path": " "}}, "model_name_or_path is empty"),
        ({"model": {"dtype": "fp32"}}, "model.dtype must be one of"),
    ],
)
def test_bad_model_sections_are_clear_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(raw)


def test_load_model_quantizes_through_trl(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from imm_trl import loop
    from imm_trl.models import tiny_model

    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kwargs: seen.update(kwargs) or model)
    config = parse_recipe({"model": {"model_name_or_path": str(tmp_path), "load_in_4bit": True}, "peft": {}}).model
    assert loop.load_model(config)[0] is model
    quantization = seen["quantization_config"]
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_type == "nf4"
