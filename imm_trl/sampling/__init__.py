"""Samplers: `generate(prompts, n, params) -> list[list[str]]` over HF `generate` or vLLM, plus
`update_weights` and `close` (the `Sampler` protocol); every sampler is a context manager.

`VLLMSampler` is imported lazily: importing vLLM is slow and not every install has it.
"""

from imm_trl.sampling.base import (
    GenerationStats,
    PartialSampler,
    Prompt,
    Sampler,
    SamplerBase,
    SamplingParams,
    as_sampler,
    cut_at_stop,
    prompt_token_ids,
    render_prompt,
)
from imm_trl.sampling.hf import HFSampler, HFSamplerConfig

__all__ = [
    "GenerationStats",
    "HFSampler",
    "HFSamplerConfig",
    "PartialSampler",
    "Prompt",
    "Sampler",
    "SamplerBase",
    "SamplingParams",
    "VLLMSampler",
    "VLLMSamplerConfig",
    "as_sampler",
    "cut_at_stop",
    "prompt_token_ids",
    "render_prompt",
]


def __getattr__(name):
    if name in ("VLLMSampler", "VLLMSamplerConfig"):
        from imm_trl.sampling import vllm_backend

        return getattr(vllm_backend, name)
    raise AttributeError(name)
