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


# -- Merger ------------------------------------------------------------------------------------

MERGER_METHODS = (
    "merge", "merged_parameter_names", "state_tensors", "load_state_tensors", "anchor_tensors",
    "move_anchor_", "load_anchor_tensors", "anchored_weights", "merged_tensors",
    "load_merged_tensors", "master_tensors", "load_master_tensors",
)


def lora_model():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model(seed=0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)


def full_model():
    return tiny_model(seed=0)[0]


def train_a_little_(model):
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))


@pytest.mark.parametrize("build", [lora_model, full_model], ids=["LoraMerger", "FullWeightMerger"])
def test_every_merger_keeps_the_merger_protocol(build):
    import torch

    from imm_trl.merging import MergeConfig, Merger, merger_for

    torch.manual_seed(0)
    model = build()
    merger = merger_for(model, MergeConfig(method="linear", ratio=0.5), reset_seed=0)
    assert isinstance(merger, Merger)
    for name in MERGER_METHODS:
        assert callable(getattr(merger, name)), name
    names = merger.merged_parameter_names()
    anchors = {n: t.clone() for n, t in merger.anchor_tensors().items()}
    assert names and set(anchors) == set(names) and merger.master_tensors() == {}

    train_a_little_(model)
    before = merger.state_tensors(model)
    trained = {name: weight.clone() for name, _, weight in merger.anchored_weights(model)}
    merger.merge(model, iteration=1, reset=True, ratio=None)  # the same call for every merger
    merged = {name: weight for name, _, weight in merger.anchored_weights(model)}
    for name in names:  # G_1 = theta0 + 0.5 * (theta_1 - theta0)
        expected = anchors[name].float() + 0.5 * (trained[name].float() - anchors[name].float())
        torch.testing.assert_close(merged[name].float(), expected, rtol=0, atol=1e-5)
    # Undo the merge, then restore it from its merged tensors: the same weights again.
    after = {n: t.detach().clone() for n, t in merger.merged_tensors(model).items()}
    merger.load_state_tensors(model, before)
    restored = {name: weight for name, _, weight in merger.anchored_weights(model)}
    assert all(torch.equal(restored[n], trained[n]) for n in names)
    merger.load_merged_tensors(model, after)
    assert all(torch.equal(merger.merged_tensors(model)[n], after[n]) for n in names)
    # A moving anchor, and loading anchors back.
    merger.move_anchor_(model, 0.5)
    assert any(not torch.equal(merger.anchor_tensors()[n], anchors[n]) for n in names)
    merger.load_anchor_tensors(anchors)
    assert all(torch.equal(merger.anchor_tensors()[n], anchors[n]) for n in names)
    merger.load_master_tensors({})  # nothing quantized: nothing to load
