"""Every sampler keeps the `Sampler` protocol and every merger the `Merger` protocol: the
methods the IMM loop calls exist, are callable, and behave on the tiny model."""

import inspect

import pytest

from imm_trl.models import tiny_model
from imm_trl.sampling import (
    HFSampler,
    HFSamplerConfig,
    PartialSampler,
    Sampler,
    SamplerBase,
    SamplingParams,
    as_sampler,
)

SAMPLER_METHODS = ("generate", "update_weights", "close", "__enter__", "__exit__")


def sampler_classes():
    from imm_trl.distributed import ShardedSampler
    from imm_trl.sampling.vllm_backend import VLLMSampler  # imports no vLLM until an engine starts

    return [HFSampler, VLLMSampler, ShardedSampler, PartialSampler]


@pytest.mark.parametrize("cls", sampler_classes(), ids=lambda c: c.__name__)
def test_every_sampler_class_has_the_protocol_methods(cls):
    for name in SAMPLER_METHODS:
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
    assert "needs_weight_updates" in dir(cls)
    assert list(inspect.signature(cls.generate).parameters) == ["self", "prompts", "n", "params"]


def test_the_hf_sampler_is_a_sampler_with_nothing_to_update_and_closes_twice():
    model, tokenizer = tiny_model(seed=0)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    with HFSampler(model, tokenizer, HFSamplerConfig(show_progress=False)) as sampler:
        assert isinstance(sampler, Sampler) and not sampler.needs_weight_updates
        assert len(sampler.generate(["1 + 1 ="], 2, params)[0]) == 2
        assert sampler.update_weights(model.state_dict()) == 0.0
    sampler.close()  # already closed by the `with`: closing again is fine
    sampler.close()


def test_the_vllm_sampler_asks_for_weights_and_closes_twice_without_an_engine():
    from imm_trl.sampling.vllm_backend import VLLMSampler

    sampler = VLLMSampler.__new__(VLLMSampler)  # no engine: only the protocol's bookkeeping
    sampler.llm = None
    assert isinstance(sampler, Sampler) and sampler.needs_weight_updates
    sampler.close()
    sampler.close()


class GenerateOnly:
    def generate(self, prompts, n, params):
        return [["x"] * n for _ in prompts]


class WithUpdates(GenerateOnly):
    def __init__(self):
        self.updates, self.closed = 0, 0

    def update_weights(self, weights):
        self.updates += 1
        return 1.0

    def close(self):
        self.closed += 1


def test_a_sampler_with_only_generate_is_completed_with_no_ops():
    assert not isinstance(GenerateOnly(), Sampler)
    sampler = as_sampler(GenerateOnly())
    assert isinstance(sampler, Sampler) and isinstance(sampler, PartialSampler)
    assert not sampler.needs_weight_updates and sampler.update_weights({}) == 0.0
    with sampler:
        assert sampler.generate(["a", "b"], 2, SamplingParams()) == [["x", "x"], ["x", "x"]]
    partial = WithUpdates()
    wrapped = as_sampler(partial)
    assert wrapped.needs_weight_updates and wrapped.update_weights({}) == 1.0
    wrapped.close()
    assert (partial.updates, partial.closed) == (1, 1)
    whole = HFSampler.__new__(HFSampler)
    assert as_sampler(whole) is whole  # a whole sampler is not wrapped


def test_the_sharded_sampler_passes_the_protocol_to_the_wrapped_sampler():
    from types import SimpleNamespace

    from imm_trl.distributed import ShardedSampler

    inner = WithUpdates()
    sharded = ShardedSampler(inner, SimpleNamespace(process_index=0, num_processes=1))
    assert isinstance(sharded, Sampler) and sharded.needs_weight_updates
    assert sharded.update_weights({}) == 1.0
    with sharded:
        pass
    assert (inner.updates, inner.closed) == (1, 1)
    assert isinstance(ShardedSampler(GenerateOnly(), None), SamplerBase)
