"""vLLM backend on the tiny model: k samples, LoRA requests, in-place weight updates.

One engine for the whole module (starting one takes seconds even for a tiny model)."""

import pytest
import torch

from imm_trl.models import tiny_model
from imm_trl.sampling import HFSampler, HFSamplerConfig, SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "user", "content": "Tom has 5 apples and buys 12 more."}],
    "Question: what is 2 + 2? Answer:",
]
TOKENS = {"max_new_tokens": 12}
GREEDY = SamplingParams(temperature=0, **TOKENS)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = tiny_model(seed=0)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

    _, tokenizer = tiny_model(seed=0)
    config = VLLMSamplerConfig(
        dtype="float32",
        max_model_len=256,
        cpu_kv_cache_gib=1,
        enable_lora=True,
        max_lora_rank=8,
        show_progress=False,
    )
    sampler = VLLMSampler(tiny_dir, tokenizer, config)
    yield sampler
    sampler.close()


def hf_greedy(model, tokenizer, prompts=PROMPTS):
    return HFSampler(model, tokenizer, HFSamplerConfig(show_progress=False)).generate(
        prompts, 1, GREEDY
    )


def test_vllm_tiny_k_samples_per_prompt(engine):
    outputs = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=12))
    assert [len(samples) for samples in outputs] == [4, 4, 4]
    assert sum(len(set(samples)) > 1 for samples in outputs) >= 2
    assert engine.stats.completions == 12 and engine.stats.generated_tokens > 0


def test_vllm_tiny_greedy_matches_hf(engine):
    model, tokenizer = tiny_model(seed=0)
    assert engine.generate(PROMPTS, 1, GREEDY) == hf_greedy(model, tokenizer)


def test_vllm_lora_request_matches_hf_peft_model(engine, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model(seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = hf_greedy(peft_model, tokenizer)
    assert expected != hf_greedy(tiny_model(seed=0)[0], tokenizer)  # the adapter matters

    engine.set_lora_adapter(tmp_path / "adapter")
    try:
        assert engine.generate(PROMPTS, 1, GREEDY) == expected
    finally:
        engine.set_lora_adapter(None)


def test_vllm_in_place_update_follows_hf_weights(engine):
    """Update the running engine to other weights and back, without a restart."""
    original, tokenizer = tiny_model(seed=0)
    other, _ = tiny_model(seed=1)
    before = engine.generate(PROMPTS, 1, GREEDY)
    seconds = engine.update_weights(other.state_dict())
    assert seconds < 10
    after = engine.generate(PROMPTS, 1, GREEDY)
    assert after == hf_greedy(other, tokenizer)
    assert after != before
    engine.update_weights(original.state_dict())
    assert engine.generate(PROMPTS, 1, GREEDY) == before


def test_vllm_top_p_near_zero_is_greedy(engine):
    """The fast top-p logits processor runs in the engine: with a tiny top_p only the argmax
    survives, so every sample is the greedy completion (vLLM's own top-p is off: top_p=1)."""
    assert engine.uses_fast_top_p
    greedy = engine.generate(PROMPTS, 1, GREEDY)
    sampled = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, top_p=1e-6, **TOKENS))
    assert sampled == [samples * 4 for samples in greedy]
    free = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, top_p=0.9, **TOKENS))
    assert sum(len(set(samples)) > 1 for samples in free) >= 2


def test_nucleus_processor_follows_batch_rows():
    """Rows are added, removed, moved and swapped as vLLM's persistent batch changes."""
    from vllm import SamplingParams as EngineParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from imm_trl.sampling.vllm_nucleus import TOP_P_KEY, NucleusLogitsProcessor

    def params(top_p):
        return EngineParams(extra_args={TOP_P_KEY: top_p} if top_p else None)

    processor = NucleusLogitsProcessor(None, torch.device("cpu"), False)
    processor.update_state(
        BatchUpdate(
            3,
            removed=[],
            added=[(i, params(p), [], []) for i, p in enumerate([0.5, None, 0.9])],
            moved=[],
        )
    )
    assert processor.top_p == {0: 0.5, 2: 0.9}
    processor.update_state(
        BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)])
    )
    assert processor.top_p == {0: 0.9}
    processor.update_state(
        BatchUpdate(2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)])
    )
    assert processor.top_p == {1: 0.9}
    logits = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    out = processor.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and out[1].isinf().tolist() == [False, True, True]
