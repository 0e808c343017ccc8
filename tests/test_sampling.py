"""HF sampling backend on the tiny model (fast tier) and on the real default model."""

import pytest
import torch

from imm_trl.models import tiny_model
from imm_trl.sampling import HFSampler, HFSamplerConfig, Sampler, SamplingParams, cut_at_stop
from imm_trl.sampling.hf import auto_batch_size

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
