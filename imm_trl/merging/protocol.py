"""The `Merger` protocol: what the IMM loop (`imm_trl.callback`, `imm_trl.step_mode`,
`imm_trl.checkpoints`) asks of a merger, so that no caller reads a merger's fields or asks
which kind it holds. `LoraMerger` and `FullWeightMerger` implement it; `merger_for` picks one.

Names are parameter names of the plain (non-PEFT) model, e.g.
`model.layers.0.mlp.up_proj.weight`: the names a transformers checkpoint uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from imm_trl.merging.config import MergeConfig


@runtime_checkable
class Merger(Protocol):
    """Merges a trained model back towards its anchor (theta0), in place, once per iteration."""

    config: MergeConfig

    def merge(self, model: nn.Module, iteration: int = 1, reset: bool = True, ratio=None) -> None:
        """G_t = anchor + ratio * M(theta_t - anchor) in place, at iteration `iteration`'s ratio
        (or `ratio`, a number or ratio map); `reset` re-initialises an adapter afterwards."""
        ...

    def merged_parameter_names(self) -> list[str]:
        """Every weight a merge writes."""
        ...

    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copies of everything `merge` changes, to try a merge and undo it."""
        ...

    def load_state_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what `state_tensors` copied."""
        ...

    def anchor_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors merges are anchored at (theta0 until `move_anchor_`), by name."""
        ...

    def move_anchor_(self, model: nn.Module, decay: float) -> None:
        """anchor <- decay * anchor + (1 - decay) * G (an EMA of the merged models)."""
        ...

    def load_anchor_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace every anchor with `tensors[name]` (a checkpoint's)."""
        ...

    def anchored_weights(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, anchor, weight the model computes with) for every weight a merge writes."""
        ...

    def merged_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The live merged weights G of everything a merge writes (quantized ones as their
        dense master copy), by name: what a checkpoint must hold to restore the merge."""
        ...

    def load_merged_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `merged_tensors` back in place (re-quantizing quantized layers)."""
        ...

    def master_tensors(self) -> dict[str, torch.Tensor]:
        """The dense master copy of each quantized weight (QLoRA), by name; empty without
        quantized weights. They, not the 4/8-bit roundings, are the merged model."""
        ...

    def load_master_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy into the named master copies and re-quantize their layers from them."""
        ...


def merger_for(model: nn.Module, config: MergeConfig, reset_seed: int | None = None) -> Merger:
    """The merger for `model`: `LoraMerger` for a PEFT model (adapter re-initialised with
    `reset_seed`), else `FullWeightMerger`. Build it before training starts: it captures
    theta0."""
    from imm_trl.checkpoints import is_peft_model
    from imm_trl.merging.lora import LoraMerger
    from imm_trl.merging.state_dict import FullWeightMerger

    if is_peft_model(model):
        return LoraMerger(model, config, reset_seed=reset_seed)
    return FullWeightMerger(model, config)
