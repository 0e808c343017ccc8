"""HF sampling backend on the tiny model (fast tier) and on the real default model."""

import os
import sys
import types

import pytest
import torch

from imm_trl.models import tiny_model
from imm_trl.sampling import HFSampler, HFSamplerConfig, Sampler, SamplingParams, cut_at_stop
from imm_trl.sampling.hf import auto_batch_size
from imm_trl.sampling.nucleus import nucleus_filter_

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "user", "content": "Tom has 5 apples and buys 12 more. How many apples now?"}],
    [{"role": "system", "content": "Solve the problem."}, {"role": "user", "content": "2 * 8?"}],
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def quiet(config=None):
    config = config or HFSamplerConfig()
    config.show_progress = False
    return config


def test_hf_sampler_gives_k_samples_per_prompt_for_chat_and_text_prompts(tiny):
    model, tokenizer = tiny
    sampler = HFSampler(model, tokenizer, quiet())
    assert isinstance(sampler, Sampler)
    prompts = [*CHAT_PROMPTS, "Question: what is 3 + 4? Answer:"]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    outputs = sampler.generate(prompts, 4, params)
    assert [len(samples) for samples in outputs] == [4] * len(prompts)
    assert all(isinstance(text, str) for samples in outputs for text in samples)
    # Sampling at temperature 1 from a random model: the 4 samples of a prompt are not all equal.
    assert sum(len(set(samples)) > 1 for samples in outputs) >= 3
    assert sampler.stats.completions == 16
    assert 0 < sampler.stats.generated_tokens <= 16 * 12


def test_hf_sampler_same_seed_same_samples(tiny):
    model, tokenizer = tiny
    sampler = HFSampler(model, tokenizer, quiet())
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=123)
    assert sampler.generate(CHAT_PROMPTS, 2, params) == sampler.generate(CHAT_PROMPTS, 2, params)


def test_hf_sampler_batching_and_sorting_keep_prompt_order(tiny):
    """Greedy outputs must not depend on the batch size (so sorting and left padding do not
    mix up prompts or change what the model sees)."""
    model, tokenizer = tiny
    prompts = [*CHAT_PROMPTS, "a", "The capital of France is Paris. Let's think step by step."]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    one_by_one = HFSampler(model, tokenizer, quiet(HFSamplerConfig(batch_size=1)))
    batched = HFSampler(model, tokenizer, quiet(HFSamplerConfig(batch_size=8)))
    expected = one_by_one.generate(prompts, 2, greedy)
    assert batched.generate(prompts, 2, greedy) == expected
    assert all(samples[0] == samples[1] for samples in expected)


def test_hf_sampler_with_peft_adapter_changes_outputs(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model(seed=0)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    base_outputs = HFSampler(model, tokenizer, quiet()).generate(CHAT_PROMPTS, 1, greedy)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    peft_model.train()
    adapted = HFSampler(peft_model, tokenizer, quiet()).generate(CHAT_PROMPTS, 1, greedy)
    assert peft_model.training  # the sampler restores the training mode it found
    assert [len(s) for s in adapted] == [1, 1, 1]
    assert adapted != base_outputs


def test_stop_strings_end_the_text_before_the_stop(tiny):
    model, tokenizer = tiny
    sampler = HFSampler(model, tokenizer, quiet())
    free = sampler.generate(CHAT_PROMPTS, 1, SamplingParams(temperature=0, max_new_tokens=24))
    first_char = next(text[3] for (text,) in free if len(text) > 4)
    stopped = sampler.generate(
        CHAT_PROMPTS, 1, SamplingParams(temperature=0, max_new_tokens=24, stop=(first_char,))
    )
    for (full,), (cut,) in zip(free, stopped, strict=True):
        assert first_char not in cut
        assert full.startswith(cut)
    assert cut_at_stop("x = 4\nQuestion: y", ["\nQuestion:", "####"]) == "x = 4"


def test_auto_batch_size_follows_memory(tiny):
    model, _ = tiny
    small = auto_batch_size(model, 512, memory_bytes=10 * 1024**2, max_batch_size=1024)
    large = auto_batch_size(model, 512, memory_bytes=1000 * 1024**2, max_batch_size=1024)
    assert 1 <= small < large <= 1024
    assert auto_batch_size(model, 512, memory_bytes=1, max_batch_size=64) == 1


# The default-model HF checks live in test_sampling_vllm_default.py, next to vLLM's.


def test_nucleus_filter_keeps_what_transformers_top_p_keeps():
    """Peaked rows (as a language model's) end within the candidates; flat rows take the
    full-sort fallback. Both keep exactly the tokens transformers' TopPLogitsWarper keeps."""
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    vocab = 49152
    peaked = torch.randn(32, vocab, generator=generator) * 8
    flat = torch.randn(8, vocab, generator=generator) * 0.5  # nucleus of thousands of tokens
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        for top_p in (0.3, 0.95):
            ours = nucleus_filter_(logits.clone(), top_p)
            theirs = TopPLogitsWarper(top_p)(None, logits.clone())
            assert torch.equal(ours.isinf(), theirs.isinf())
            kept = ~ours.isinf()
            assert torch.equal(ours[kept], logits[kept])  # kept logits are untouched
    kept_peaked = (~nucleus_filter_(peaked.clone(), 0.95).isinf()).sum(dim=-1)
    assert 1 <= kept_peaked.min() and kept_peaked.max() < 256
    assert (~nucleus_filter_(flat.clone(), 0.95).isinf()).sum(dim=-1).min() > 256


def test_nucleus_filter_per_row_top_p_and_edge_cases():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    probs = logits[0].softmax(dim=0)  # 0.644, 0.237, 0.087, 0.032
    out = nucleus_filter_(logits.clone(), torch.tensor([0.5, 1.0, 0.6]))
    assert out[0].isinf().tolist() == [False, True, True, True]  # mass above token 2 is 0.644
    assert torch.equal(out[1], logits[1])  # top_p = 1 leaves the row alone
    assert not out[2].isinf().any()  # exact ties with the last kept token are all kept
    out = nucleus_filter_(logits[:1].clone(), float(probs[0] + probs[1]) + 1e-4)
    assert out[0].isinf().tolist() == [False, False, False, True]


def test_hf_top_p_near_zero_is_greedy(tiny):
    """With a tiny top_p only the most likely token survives, so sampling is greedy decoding:
    shows the fast top-p path runs (and keeps the argmax) inside HF generate."""
    model, tokenizer = tiny
    greedy = HFSampler(model, tokenizer, quiet()).generate(
        CHAT_PROMPTS, 1, SamplingParams(temperature=0, max_new_tokens=10)
    )
    for fast in (True, False):
        sampler = HFSampler(model, tokenizer, quiet(HFSamplerConfig(fast_top_p=fast)))
        sampled = sampler.generate(
            CHAT_PROMPTS, 3, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=0)
        )
        assert sampled == [samples[0:1] * 3 for samples in greedy]


def test_hf_fast_top_p_samples_like_transformers_top_p(tiny):
    """Same seed, same kept tokens, same probabilities: the fast path draws the same samples."""
    model, tokenizer = tiny
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=3)
    fast = HFSampler(model, tokenizer, quiet(HFSamplerConfig(fast_top_p=True)))
    stock = HFSampler(model, tokenizer, quiet(HFSamplerConfig(fast_top_p=False)))
    assert fast.generate(CHAT_PROMPTS, 2, params) == stock.generate(CHAT_PROMPTS, 2, params)


# -- VLLMSampler's environment, with a stand-in engine (no vLLM needed) -------------------------

ENGINE_VARIABLES = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_AOT_COMPILE")


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module whose `LLM` records the engine variables it was built under (or fails)."""

    from imm_trl.sampling import vllm_backend

    built = []

    class FakeLLM:
        fail = False

        def __init__(self, **kwargs):
            built.append({name: os.environ.get(name) for name in ENGINE_VARIABLES})
            if FakeLLM.fail:
                raise RuntimeError("engine failed to start")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(vllm_backend, "_on_cpu", lambda: True)
    for name in ENGINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return FakeLLM, built


def vllm_sampler(**config):
    from imm_trl.sampling.vllm_backend import VLLMSampler, VLLMSamplerConfig

    return VLLMSampler("model-dir", None, VLLMSamplerConfig(fast_top_p=False, **config))


def test_vllm_engine_variables_hold_only_while_the_engine_is_built(fake_vllm):
    _, built = fake_vllm
    vllm_sampler()
    assert built == [{"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "0"}]
    assert [name for name in ENGINE_VARIABLES if name in os.environ] == []


def test_vllm_engine_variables_keep_the_users_values(fake_vllm, monkeypatch):
    _, built = fake_vllm
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    vllm_sampler()  # in process: the engine needs multiprocessing off; AOT: the user's choice
    assert built == [{"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "1"}]
    assert {name: os.environ[name] for name in ENGINE_VARIABLES} == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_USE_AOT_COMPILE": "1",
    }


def test_vllm_engine_variables_are_restored_when_the_engine_fails(fake_vllm):
    fake_llm, built = fake_vllm
    fake_llm.fail = True
    with pytest.raises(RuntimeError, match="engine failed to start"):
        vllm_sampler()
    assert built and [name for name in ENGINE_VARIABLES if name in os.environ] == []


def test_vllm_out_of_process_engine_leaves_multiprocessing_alone(fake_vllm):
    _, built = fake_vllm
    vllm_sampler(in_process=False)
    assert built == [{"VLLM_ENABLE_V1_MULTIPROCESSING": None, "VLLM_USE_AOT_COMPILE": "0"}]
