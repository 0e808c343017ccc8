"""The merging engine on the real default model (SmolLM2-135M-Instruct)."""

import copy
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from imm_trl.merging import LoraMerger, MergeConfig, merge_checkpoints, merge_state_dicts

pytestmark = pytest.mark.integration


def test_smollm2_lora_merge_at_alpha_one_generates_like_merge_and_unload(default_model_dir):
    from imm_trl.models import load_default_model

    model, tokenizer = load_default_model(dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    reference = copy.deepcopy(peft_model).merge_and_unload()
    LoraMerger(peft_model, MergeConfig(ratio=1.0), theta0_dir=default_model_dir).merge(peft_model)
    messages = [{"role": "user", "content": "What is 12 + 30? Answer with a number."}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(
            peft_model.generate(**prompt, **kwargs), reference.generate(**prompt, **kwargs)
        )


def test_smollm2_checkpoint_merge_loads_and_equals_in_memory(default_model_dir, tmp_path):
    base = load_file(default_model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    tuned = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    (tmp_path / "tuned").mkdir()
    save_file(tuned, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(default_model_dir / "config.json", tmp_path / "tuned" / "config.json")
    out = merge_checkpoints(
        default_model_dir,
        tmp_path / "tuned",
        tmp_path / "out",
        method="dare_linear",
        ratio=0.5,
        density=0.8,
        max_shard_bytes=200 * 2**20,
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = merge_state_dicts(base, tuned, method="dare_linear", ratio=0.5, density=0.8)
    got = merged.state_dict()
    assert set(expected) == set(got) - {"lm_head.weight"}  # tied: the checkpoint has no lm_head
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(got["lm_head.weight"], expected["model.embed_tokens.weight"])
