"""bitsandbytes 4-bit and 8-bit weights, in one place: recognise, dequantize, re-quantize, and
undo the CPU inference packing that would silently stop training.

QLoRA merging keeps a dense master copy of each quantized weight (`imm_trl.merging.lora`); these
helpers move between that copy and the layer's quantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_PARAMETER_TYPES = ("Params4bit", "Int8Params")


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` is a bitsandbytes 4-bit or 8-bit parameter."""
    return type(weight).__name__ in QUANTIZED_PARAMETER_TYPES


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a (possibly bitsandbytes-quantized) linear layer."""
    weight = layer.weight
    if not is_quantized(weight):
        return weight.detach()
    from peft.utils.integrations import dequantize_bnb_weight

    state = (
        getattr(layer, "state", None)
        if type(weight).__name__ == "Int8Params"
        else weight.quant_state
    )
    if type(weight).__name__ == "Int8Params" and state is not None and state.SCB is None:
        state.SCB = weight.SCB
    return dequantize_bnb_weight(weight, state=state)


def requantize(layer: nn.Module, dense: torch.Tensor) -> None:
    """Replace a bitsandbytes layer's weight by the quantization of `dense` (as PEFT's merge does)."""
    import bitsandbytes as bnb

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        layer.weight = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(weight.device)
    else:
        layer.weight = bnb.nn.Int8Params(
            dense.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
        layer.state.reset_grads()
        layer.state.SCB = layer.weight.SCB


def unpack_cpu_4bit_weights(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights; returns how many it unpacked.

    On a CPU with avx512_bf16, a `Linear4bit` run in eval mode without grad (as generation
    does) repacks its weight for a faster CPU kernel and keeps it packed. That kernel has no
    backward, so training afterwards silently gets zero gradients (bitsandbytes 0.50, measured:
    grad_norm 0 after one `generate`). Sampling then training is exactly IMM's loop, so the
    weights are unpacked before every training run and every merge.
    """
    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    unpacked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            unpacked += 1
    return unpacked
