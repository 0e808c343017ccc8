"""Tensor-parallel merges: the same bits as one thread, the caller's grad mode and thread count
kept, errors surfaced."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from imm_trl.merging import FullWeightMerger, LoraMerger, MergeConfig
from imm_trl.merging.parallel import for_each_tensor, single_threaded_kernels
from imm_trl.models import tiny_model


def _lora_model(seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    model, _ = tiny_model(seed=0)
    peft_model = get_peft_model(model.to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(dtype) * 0.05)
    return peft_model


def _merged_base(threads: int, dtype: torch.dtype, method: str) -> dict[str, torch.Tensor]:
    previous = torch.get_num_threads()
    torch._C.set_num_threads(threads)  # torch.set_num_threads may be vLLM's no-op
    try:
        model = _lora_model(1, dtype)
        config = MergeConfig(method=method, ratio=0.5, density=0.7 if method == "dare_linear" else 1.0)
        LoraMerger(model, config).merge(model, iteration=1)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    finally:
        torch._C.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["linear", "dare_linear", "ties"])
def test_lora_merge_on_two_threads_is_bit_identical_to_one(dtype, method):
    one, two = _merged_base(1, dtype, method), _merged_base(2, dtype, method)
    before = {n: p for n, p in _lora_model(1, dtype).named_parameters() if "lora_" not in n}
    assert one.keys() == two.keys() == before.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    targeted = [n for n in one if n.endswith("base_layer.weight")]
    assert targeted and all(not torch.equal(one[n], before[n]) for n in targeted)


def test_full_weight_merge_on_two_threads_is_bit_identical_to_one():
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch._C.set_num_threads(threads)  # torch.set_num_threads may be vLLM's no-op
        try:
            model, _ = tiny_model(seed=0)
            merger = FullWeightMerger(model, MergeConfig(method="dare_linear", ratio=0.3, density=0.5))
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.01)
            merger.merge(model, iteration=2)
            results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        finally:
            torch._C.set_num_threads(previous)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_for_each_tensor_keeps_grad_mode_and_thread_count_and_raises(monkeypatch):
    previous = torch.get_num_threads()
    torch._C.set_num_threads(2)
    # as after vLLM's in-process CPU worker started: torch.set_num_threads is a no-op
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    try:
        modes = []
        with torch.no_grad():
            for_each_tensor(lambda _: modes.append(torch.is_grad_enabled()), range(4))
        assert modes == [False] * 4
        inside = []
        for_each_tensor(lambda _: inside.append(torch.get_num_threads()), range(4))
        assert inside == [1] * 4 and torch.get_num_threads() == 2

        def fail(item):
            if item == 2:
                raise ValueError("tensor 2 is broken")

        with pytest.raises(ValueError, match="tensor 2 is broken"):
            for_each_tensor(fail, range(4))
        assert torch.get_num_threads() == 2
        with single_threaded_kernels() as before:
            assert before == 2 and torch.get_num_threads() == 1
    finally:
        torch._C.set_num_threads(previous)
