"""`run_imm(recipe)`: the IMM loop for users without a training script.

A recipe is a YAML file with one section per component (torchtune style):

    model: {model_name_or_path: default, dtype: float32}  # trl.ModelConfig
    data:  {suite: default, n_train: 200, n_eval: 100}  # DataArguments
    peft:  {r: 16, lora_alpha: 32, target_modules: all-linear}   # LoraConfig; null = full FT
    sft:   {learning_rate: 1.0e-4, max_steps: 20, ...}  # trl.SFTConfig
    imm:   {preset: paper, sampler: vllm, ...}          # IMMConfig

`run_imm` builds exactly the `SFTTrainer` + `IMMCallback` a user would write by hand and calls
`trainer.train()` once; `imm-trl run --config recipe.yaml --imm.iterations 2` is the same
from the shell (flags override the YAML, dotted by section).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from imm_trl.validation import check_choice, check_dataclass, check_values, check_writable_dir

SECTIONS = ("model", "data", "peft", "sft", "imm")
# `model_name_or_path: default` is the offline SmolLM2-135M-Instruct (imm_trl.models).
DEFAULT_MODEL = "default"
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
# trl.ModelConfig's adapter fields: read by trl.get_peft_config only with `use_peft: true`.
MODEL_PEFT_KEYS = frozenset(
    {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
     "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora"}
)
# SFTConfig's own checks of this machine's hardware (bf16 on a CPU) are left to the trainer:
# a recipe for a GPU must still validate on a laptop.
HARDWARE_NEUTRAL_SFT = {"bf16": False, "fp16": False, "use_cpu": True}


@dataclass
class DataArguments:
    """Recipe section `data`: the ID training questions and the eval sets."""

    suite: str | None = field(
        default="default", metadata={"help": "A built-in task suite (imm_trl.tasks.SUITES)."}
    )
    train_jsonl: str | None = field(
        default=None, metadata={"help": "GSM8K-format JSONL of training questions (replaces `suite`)."}
    )
    eval_jsonl: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Eval sets from GSM8K-format JSONL files: name -> path."}
    )
    template: str | None = field(
        default=None, metadata={"help": "Prompt template for JSONL questions (imm_trl.tasks.TEMPLATES)."}
    )
    n_train: int = field(default=200, metadata={"help": "Training questions drawn."})
    n_eval: int = field(default=100, metadata={"help": "Questions per eval set."})
    seed: int = field(default=0, metadata={"help": "Seed of the question draw."})

    def __post_init__(self) -> None:
        check_dataclass(self)


@dataclass
class Recipe:
    """A parsed, validated recipe."""

    model: Any  # trl.ModelConfig
    data: DataArguments
    peft: dict[str, Any] | None
    sft: dict[str, Any]
    imm: dict[str, Any]


def check_keys(section: str, values: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(
            f"recipe section {section!r} has unknown key(s) {unknown}; valid keys: {sorted(allowed)}"
        )


def parse_value(text: str) -> Any:
    """A flag value read as YAML, except that `1e-5` is a number (YAML 1.1 wants `1.0e-5`)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(flag: str, value: str) -> tuple[str, str, Any]:
    """`--imm.iterations`, `"2"` -> ("imm", "iterations", 2)."""
    section, _, key = flag.removeprefix("--").partition(".")
    if section not in SECTIONS or not key:
        raise ValueError(f"override {flag!r} must look like --<section>.<key> with section in {SECTIONS}")
    return section, key, parse_value(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `["--imm.iterations", "2", "--sft.learning_rate", "1e-5", ...]` to a raw recipe."""
    if len(overrides) % 2:
        raise ValueError(f"overrides come in --section.key value pairs; got {overrides}")
    raw = copy.deepcopy(check_recipe_mapping(raw))
    for flag, value in zip(overrides[::2], overrides[1::2], strict=True):
        name, key, parsed = parse_override(flag, value)
        raw[name] = {**(recipe_section(raw, name) or {}), key: parsed}
    return raw


def check_recipe_mapping(raw: Any) -> dict[str, Any]:
    """`raw` if it is a mapping of sections, else a ValueError saying what a recipe is."""
    if not isinstance(raw, dict):
        raise ValueError(
            f"recipe must be a mapping with sections {', '.join(SECTIONS)} (got a "
            f"{type(raw).__name__}: {str(raw)[:60]!r}); see imm_trl/recipes/default.yaml"
        )
    return raw


def recipe_section(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Recipe section `name` as a dict (None if absent or null); anything else is an error."""
    values = raw.get(name)
    if values is not None and not isinstance(values, dict):
        raise ValueError(
            f"recipe section {name!r} must be a mapping of key: value (got {values!r}); "
            f"write e.g. {name}: {{...}}"
        )
    return values


def checked_section(name: str, values: dict[str, Any], build) -> Any:
    """`build(**values)`, with the library's own errors re-raised naming the section."""
    try:
        return build(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe section {name!r}: {error}") from error


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate every section against the dataclass it feeds; typos are errors, not ignored."""
    check_keys("recipe", check_recipe_mapping(raw), set(SECTIONS))
    from peft import LoraConfig
    from trl import SFTConfig

    from imm_trl.config import IMMConfig

    model = parse_model_section(recipe_section(raw, "model") or {})
    data = dict(recipe_section(raw, "data") or {})
    check_keys("data", data, {f.name for f in fields(DataArguments)})
    peft = recipe_section(raw, "peft")
    if peft is not None and model.use_peft:
        raise ValueError(
            "recipe gives the adapter twice: a `peft` section and model.use_peft: true; keep "
            "one (the `peft` section takes any peft.LoraConfig field)"
        )
    if peft is not None:
        check_keys("peft", peft, {f.name for f in fields(LoraConfig)})
        check_values("peft", peft, LoraConfig)  # LoraConfig does not check types itself
        checked_section("peft", peft, LoraConfig)
    sft = dict(recipe_section(raw, "sft") or {})
    check_keys("sft", sft, {f.name for f in fields(SFTConfig)})
    check_values("sft", sft, SFTConfig)
    if sft.get("output_dir") is not None:
        check_writable_dir(sft["output_dir"], "sft.output_dir")
    checked_section(
        "sft", {"output_dir": "imm-trl-output", **sft, **HARDWARE_NEUTRAL_SFT}, SFTConfig
    )
    imm = dict(recipe_section(raw, "imm") or {})
    check_keys("imm", imm, {f.name for f in fields(IMMConfig)} | {"preset"})
    recipe = Recipe(model, DataArguments(**data), peft, sft, imm)
    if (model.load_in_4bit or model.load_in_8bit) and peft is None and not model.use_peft:
        raise ValueError(
            "a quantized base can only be trained through an adapter: add a `peft` section"
        )
    IMMConfig.from_dict(imm)  # IMM values are checked before any loading
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe: a YAML path or the name of a packaged recipe
    (`default`, `paper`, ...: `imm_trl.recipes`)."""
    from imm_trl.recipes import read_recipe

    return parse_recipe(apply_overrides(read_recipe(path), overrides or []))


def load_questions(data: DataArguments):
    """The training QuestionSet and the eval sets a recipe names."""
    from imm_trl.tasks import load_jsonl_questions, load_suite

    eval_sets = {}
    if data.train_jsonl is not None:
        template = data.template or "cot"
        train = load_jsonl_questions(data.train_jsonl, limit=data.n_train, seed=data.seed, template=template)
    elif data.suite is not None:
        suite = load_suite(data.suite, seed=data.seed, n_train=data.n_train, n_eval=data.n_eval)
        train, eval_sets = suite.train, dict(suite.eval_sets)
    else:
        raise ValueError("data: give a `suite` or a `train_jsonl`")
    for name, path in data.eval_jsonl.items():
        eval_sets[name] = load_jsonl_questions(
            path, limit=data.n_eval, seed=data.seed, template=data.template or "cot"
        )
    return train, eval_sets


def parse_model_section(values: dict[str, Any]):
    """Recipe section `model` as a `trl.ModelConfig` (TRL's own model arguments), checked
    before anything loads. `model_name_or_path` defaults to the offline default model;
    `name_or_path`, this section's key before it followed TRL, still reads as it."""
    from trl import ModelConfig

    values = dict(values)
    if "name_or_path" in values:
        if "model_name_or_path" in values:
            raise ValueError("model: give model_name_or_path only (name_or_path is its old name)")
        values["model_name_or_path"] = values.pop("name_or_path")
    values = {"model_name_or_path": DEFAULT_MODEL, **values}
    check_keys("model", values, {f.name for f in fields(ModelConfig)})
    check_values("model", values, ModelConfig)
    if values["model_name_or_path"] is None or not str(values["model_name_or_path"]).strip():
        raise ValueError(
            f"model.model_name_or_path is empty; give a model directory or hub id, or "
            f"{DEFAULT_MODEL!r} for the offline default model"
        )
    check_choice("model.dtype", values.get("dtype", "float32"), MODEL_DTYPES)
    if values.get("load_in_4bit") and values.get("load_in_8bit"):
        raise ValueError("model: load_in_4bit and load_in_8bit are both true; choose one")
    adapter_keys = sorted(MODEL_PEFT_KEYS & set(values))
    if adapter_keys and not values.get("use_peft"):
        raise ValueError(
            f"model: {adapter_keys} are read only with model.use_peft: true; add it, or put "
            "the adapter in a `peft` section (peft.LoraConfig fields)"
        )
    return checked_section("model", values, ModelConfig)


def load_model(config):
    """The model and tokenizer of a `trl.ModelConfig`, quantized by TRL's
    `get_quantization_config` when it asks for 4 or 8 bits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from imm_trl.models import default_model_dir, ensure_chat_ready

    name = config.model_name_or_path
    path = str(default_model_dir()) if name == DEFAULT_MODEL else name
    # Fields TRL has had in some versions only: trust_remote_code (dropped after 1.0).
    trust_remote_code = getattr(config, "trust_remote_code", False)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=config.model_revision,
        dtype=config.dtype if config.dtype == "auto" else getattr(torch, config.dtype),
        quantization_config=get_quantization_config(config),
        attn_implementation=config.attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=config.model_revision, trust_remote_code=trust_remote_code
    )
    ensure_chat_ready(tokenizer)
    return model, tokenizer


def peft_config(recipe: Recipe):
    """The adapter of a recipe: its `peft` section, else TRL's from model.use_peft (None: full
    fine-tuning)."""
    from peft import LoraConfig
    from trl import get_peft_config

    return LoraConfig(**recipe.peft) if recipe.peft is not None else get_peft_config(recipe.model)


def seed_dataset(train):
    """A placeholder for SFTTrainer's required `train_dataset` (IMM replaces it with D_1
    before any step runs): a few training questions with their gold answers."""
    from datasets import Dataset

    rows = [
        {"prompt": row["question"], "completion": [{"role": "assistant", "content": str(row.get("solution") or row["answer"])}]}
        for row in train.rows[:4]
    ]
    return Dataset.from_list(rows)


def build_trainer(recipe: Recipe, sampler=None):
    """The `SFTTrainer` with `IMMCallback` that a user would write for this recipe (sampling
    through `sampler` when given, else the callback's own)."""
    from trl import SFTConfig, SFTTrainer

    from imm_trl.callback import IMMCallback
    from imm_trl.config import IMMConfig

    train, eval_sets = load_questions(recipe.data)
    imm_values = {
        "verifier": train.verifier, "eval_sets": eval_sets, "solution_column": "solution",
        **recipe.imm, "questions": train.rows,
    }
    imm_config = IMMConfig.from_dict(imm_values)
    model, tokenizer = load_model(recipe.model)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**recipe.sft),
        train_dataset=seed_dataset(train),
        processing_class=tokenizer,
        peft_config=peft_config(recipe),
    )
    callback = IMMCallback(trainer, imm_config, sampler=sampler)
    trainer.add_callback(callback)
    return trainer, callback


def run_imm(
    recipe: Recipe | str | Path, overrides: list[str] | None = None, *, keep_sampler: bool = False
):
    """Run every IMM iteration of a recipe (an object, a YAML path or a packaged recipe name);
    returns the callback, whose `history` holds the per-iteration metrics (also in
    <imm output_dir>/imm_metrics.json). The sampler's engine is closed at the end, or on an
    error, unless `keep_sampler` (then `callback.sampler` still samples G_T: close it)."""
    from imm_trl.distributed import whole_parameters

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    trainer, callback = build_trainer(recipe)
    try:
        trainer.train()
        with whole_parameters(trainer.model, modify=False):  # collective; rank 0 writes
            if trainer.is_world_process_zero():
                save_final_model(trainer, callback)
    except BaseException:
        callback.close()
        raise
    if not keep_sampler:
        callback.close()
    return callback


def save_final_model(trainer, callback) -> Path:
    """G_T as a plain model directory (`from_pretrained`-ready): <imm output_dir>/final."""
    from imm_trl.checkpoints import save_merged_model

    return save_merged_model(callback.output_dir / "final", trainer.model, trainer.processing_class)


def add_run_parser(commands) -> None:
    run = commands.add_parser(
        "run",
        help="run IMM from a recipe YAML; --<section>.<key> VALUE flags override it",
        description=__doc__,
    )
    run.add_argument(
        "--config",
        required=True,
        help="a recipe YAML file, or the name of a packaged recipe (default, paper, lora_1b5, "
        "qlora_8b, zero3_vllm_7b)",
    )
    run.set_defaults(func=_run, accepts_overrides=True)


def _run(args) -> int:
    callback = run_imm(args.config, args.overrides)
    last = callback.history[-1] if callback.history else {}
    print({k: v for k, v in last.items() if isinstance(v, (int, float)) and not k.startswith("seconds/")})
    return 0
