"""Integration tier: the real default model (SmolLM2-135M-Instruct), offline."""

import os

import pytest
import torch

from imm_trl import models

pytestmark = pytest.mark.integration


def test_hub_is_off():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_default_model_loads_offline_and_knows_paris(default_model_dir):
    model, tokenizer = models.load_default_model()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation


def test_second_load_uses_the_cache(default_model_dir, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached safetensors directory should have been used")

    monkeypatch.setattr(models, "convert_gguf_to_safetensors", no_conversion)
    assert models.default_model_dir() == default_model_dir
    model, _ = models.load_default_model()
    assert model.config.num_hidden_layers == 30


def test_cache_location_follows_env_var_and_a_crash_leaves_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the tokenizer")

    monkeypatch.setattr(models.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.default_model_dir()
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no staging directory left behind

    monkeypatch.undo()
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.default_model_dir() == target
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def test_4bit_bitsandbytes_default_model_runs_forward_on_cpu():
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model, tokenizer = models.load_default_model(quantization_config=quantization)
    quantized_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized_layers) == 30 * 7  # q, k, v, o, gate, up, down in every layer
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
