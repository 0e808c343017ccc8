"""Merging whole state dicts in memory, and the full-weight merger for non-LoRA IMM runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from imm_trl.merging.config import (
    MergeConfig,
    Ratio,
    RatioMap,
    check_density,
    check_density_applies,
    check_method,
    check_ratio_patterns,
    merge_method,
    parse_ratio,
)
from imm_trl.merging.functional import merge_into_, merge_tensors
from imm_trl.merging.io import CheckpointReader
from imm_trl.merging.parallel import for_each_tensor


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    *,
    method: str = "linear",
    ratio: Ratio | RatioMap = 1.0,
    density: float = 1.0,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Merge every tensor of `base` with the same-named tensors of `tuned`.

    Tied entries (names whose base tensors are the same view of the same memory, such as
    `lm_head.weight` and `model.embed_tokens.weight` of a model with tied embeddings) are
    merged once, under the first of their names, and stay one tensor in the result; their
    tuned tensors must be equal too.

    Args:
        base: The original state dict (theta0).
        tuned: A tuned state dict, or a list of them.
        method, density, seed, weights, compute_dtype: As in `merge_tensors`.
        ratio: A number or a per-layer ratio map.

    Returns:
        `dict[str, torch.Tensor]`: The merged state dict (new tensors, base dtypes).
    """
    check_method(method)
    check_density(density)
    check_density_applies(method, density)
    ratio_map = parse_ratio(ratio)
    check_ratio_patterns(ratio_map, list(base), "the state dict")
    tuned_list = [tuned] if isinstance(tuned, Mapping) else list(tuned)
    for index, other in enumerate(tuned_list):
        missing, extra = set(base) - set(other), set(other) - set(base)
        if missing or extra:
            raise ValueError(
                f"tuned state dict {index} does not match the base: missing {sorted(missing)[:5]}, "
                f"extra {sorted(extra)[:5]}"
            )
    merged = {}
    first_of_view: dict[tuple, str] = {}
    for name, base_tensor in base.items():
        tuned_tensors = [other[name] for other in tuned_list]
        key = view_key(base_tensor)
        if key is not None and key in first_of_view:
            first = first_of_view[key]
            _check_tied_alike(first, name, [other[first] for other in tuned_list], tuned_tensors)
            merged[name] = merged[first]
            continue
        if key is not None:
            first_of_view[key] = name
        if not base_tensor.is_floating_point():
            merged[name] = base_tensor.clone()
            continue
        merged[name] = merge_tensors(
            base_tensor,
            tuned_tensors,
            method=method,
            ratio=ratio_map.ratio_for(name),
            density=density,
            seed=seed,
            weights=weights,
            name=name,
            compute_dtype=compute_dtype,
        )
    return merged


def view_key(tensor: torch.Tensor) -> tuple | None:
    """What makes two tensors the same view of the same memory (None for empty tensors)."""
    if tensor.numel() == 0:
        return None
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def _check_tied_alike(
    first: str, name: str, first_tuned: list[torch.Tensor], tuned: list[torch.Tensor]
) -> None:
    """Refuse a tuned state dict where two entries tied in the base differ."""
    for index, (a, b) in enumerate(zip(first_tuned, tuned, strict=True)):
        if view_key(a) != view_key(b) and not torch.equal(a, b):
            raise ValueError(
                f"{first} and {name} are tied in the base state dict (one tensor) but differ in tuned "
                f"state dict {index}; untie them in the base (clone one) to merge them separately"
            )


def aliased_tensors(model: nn.Module) -> set[int]:
    """`id`s of the parameters and buffers of `model` whose memory another one overlaps
    (weights tied through shared storage rather than one shared `Parameter`)."""
    spans = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.numel() and tensor.device.type == "cpu":
            extent = (
                sum(
                    (size - 1) * stride
                    for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
                )
                + 1
            )
            start = tensor.data_ptr()
            spans.append((start, start + extent * tensor.element_size(), id(tensor)))
    spans.sort()
    aliased, active = set(), []
    for start, end, ident in spans:
        active = [(e, i) for e, i in active if e > start]
        if active:
            aliased.add(ident)
            aliased.update(i for _, i in active)
        active.append((end, ident))
    return aliased


def moving_average(anchor: torch.Tensor, current: torch.Tensor, decay: float) -> torch.Tensor:
    """`decay * anchor + (1 - decay) * current`, computed in float32, as a new CPU tensor of
    the anchor's dtype."""
    mixed = anchor.float() * decay + current.detach().to("cpu", torch.float32) * (1.0 - decay)
    return mixed.to(anchor.dtype)


def capture_theta0_(param: torch.Tensor, aliased: bool = False) -> torch.Tensor:
    """Capture theta0 of a live parameter, before it is trained or merged into.

    On the CPU the parameter is given a fresh copy of its values and its original storage is
    kept as theta0; the values are the same either way. For a model loaded from safetensors
    that storage is the file mapped into memory, so theta0 costs no memory of its own (clean
    page-cache pages, which the kernel can drop and read back) and the live copy is ordinary
    memory, which merges overwrite without a copy-on-write fault per 4 KiB page. A parameter
    on an accelerator, or whose memory another tensor aliases (`aliased`), keeps its storage
    and theta0 is a CPU copy.

    Args:
        param (`torch.Tensor`): The parameter (its `.data` may be replaced).
        aliased (`bool`): Whether another tensor of the model shares its memory.

    Returns:
        `torch.Tensor`: theta0, on the CPU, never written afterwards.
    """
    data = param.detach()
    if data.device.type != "cpu" or aliased or not data.is_contiguous():
        return data.to("cpu", copy=True)
    param.data = data.clone()
    return data


class FullWeightMerger:
    """IMM merge for full fine-tuning: `G <- theta0 + alpha * M(G - theta0)`, in place.

    theta0 is captured when the merger is built, either in memory (`capture_theta0_`: the
    parameters' original storage on the CPU, else a CPU copy) or, with `theta0_dir`, read back
    tensor by tensor from the original safetensors directory when merging (nothing kept in
    memory). Tied parameters (one `Parameter`, or several sharing memory) are merged once.
    """

    def __init__(
        self, model: nn.Module, config: MergeConfig, theta0_dir: str | os.PathLike | None = None
    ):
        self.config = config
        self.theta0_dir = Path(theta0_dir) if theta0_dir is not None else None
        self._theta0: dict[str, torch.Tensor] = {}
        names = [name for name, _ in model.named_parameters()]
        self._parameter_names = names
        check_ratio_patterns(config.ratio, names, "all of the model's")
        if self.theta0_dir is None:
            aliased = aliased_tensors(model)
            self._theta0 = {
                name: capture_theta0_(param, id(param) in aliased)
                for name, param in model.named_parameters()
            }
        else:
            with CheckpointReader(self.theta0_dir) as reader:
                available = set(reader.names())
            missing = [name for name, _ in model.named_parameters() if name not in available]
            if missing:
                raise ValueError(
                    f"theta0_dir {self.theta0_dir} lacks parameters {missing[:5]}; it must be the "
                    "directory the model was loaded from"
                )

    @torch.no_grad()
    def merge(self, model: nn.Module, iteration: int = 1, reset: bool = True, ratio=None) -> None:
        """Merge `model`'s current weights with theta0, in place, at iteration `iteration`'s
        ratio (or at `ratio`, a number or ratio map, when given). `reset` is accepted for
        symmetry with `LoraMerger`: there is no adapter to re-initialise."""
        ratio_map = parse_ratio(ratio) if ratio is not None else self.config.ratio_map(iteration)
        reader = CheckpointReader(self.theta0_dir) if self.theta0_dir is not None else None
        unique, seen = [], set()
        for name, param in model.named_parameters():
            if (key := view_key(param)) not in seen:  # tied parameters are merged once
                seen.add(key)
                unique.append((name, param))

        def merge_one(named: tuple[str, nn.Parameter]) -> None:
            name, param = named
            theta0 = reader.read(name) if reader is not None else self._theta0[name]
            settings = dict(
                ratio=ratio_map.ratio_for(name), name=name, **self.config.kernel_kwargs(iteration)
            )
            if (
                merge_method(self.config.method).in_place
                and theta0.dtype == param.dtype
                and param.is_contiguous()
            ):
                merge_into_(param.data, theta0, **settings)  # in place, no tensor-sized temporaries
            else:
                param.copy_(merge_tensors(theta0.to(param.device), param.detach(), **settings))

        try:
            for_each_tensor(merge_one, unique, on_cpu=all(p.device.type == "cpu" for _, p in unique))
        finally:
            if reader is not None:
                reader.close()

    @torch.no_grad()
    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copies of every parameter (what `merge` changes), to try a merge and undo it."""
        return {name: param.detach().clone() for name, param in model.named_parameters()}

    @torch.no_grad()
    def load_state_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what `state_tensors` copied."""
        for name, param in model.named_parameters():
            param.copy_(tensors[name])

    def anchor_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors merges are anchored at (theta0 at first), by parameter name."""
        if self.theta0_dir is not None:
            raise ValueError("a moving anchor needs theta0 in memory; build the merger without theta0_dir")
        return dict(self._theta0)

    @torch.no_grad()
    def move_anchor_(self, model: nn.Module, decay: float) -> None:
        """anchor <- decay * anchor + (1 - decay) * G, G the weights after the last merge (an
        exponential moving average of the merged models, as in WARP). New tensors, so a
        memory-mapped theta0 is never written."""
        for name, param in model.named_parameters():
            self._theta0[name] = moving_average(self._theta0[name], param.detach(), decay)

    def load_anchor_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the anchors with `tensors` (a checkpoint's), by parameter name."""
        self._theta0 = {name: tensors[name].to(t.dtype).clone() for name, t in self._theta0.items()}

    # -- the rest of the `Merger` protocol (imm_trl.merging.protocol) ---------------------------

    def merged_parameter_names(self) -> list[str]:
        return list(self._parameter_names)

    def anchored_weights(self, model: nn.Module):
        """(name, anchor, weight) per parameter, tied ones once."""
        seen = set()
        for name, param in model.named_parameters():
            if (key := view_key(param)) in seen:
                continue
            seen.add(key)
            yield name, self._theta0[name], param.detach()

    def merged_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters())

    @torch.no_grad()
    def load_merged_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_tensors(model, tensors)

    def master_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # full fine-tuning trains no quantized weights

    def load_master_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"master copies {sorted(tensors)[:3]} given to a full-weight merger")
