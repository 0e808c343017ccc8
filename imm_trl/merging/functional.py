"""Merge kernels: small pure functions over tensors, no hidden state.

Every merge in imm-trl is `result = base + ratio * M(tuned - base)`, where `M` is the delta
operator of the method (docs/design.md, "The method"; the operators are described as
data in `imm_trl.merging.methods`). The functions below compute deltas, prune them
(DARE, TIES), combine several of them, and apply the result to a base tensor. Definitions of
TIES follow `peft.utils.merge_utils` (magnitude top-k, sign elected by total mass, disjoint
mean); DARE differs from PEFT in one way only: its keep mask comes from random numbers keyed
by (seed, tensor name, element index) instead of a global random generator, so the mask is
the same on every device, in every process, and for any slice of the tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from imm_trl.merging.methods import MERGE_METHODS, merge_method  # noqa: F401 (MERGE_METHODS: re-exported)

# DARE masks are drawn in fixed blocks of flat element indices, each from its own generator
# keyed by (seed, tensor name, block number): any slice of a tensor regenerates exactly the
# blocks it overlaps, so every shard and every process gets the same mask.
DARE_BLOCK = 1 << 20
# Each 64-bit random word gives four elements a 16-bit lane (a quarter of the generator work
# and of the compare of full words); the keep probability is therefore density rounded to a
# multiple of 2**-16 (DARE_LEVELS).
DARE_LANE_DTYPE = np.dtype("<u2")
DARE_LEVELS = 1 << 16
_LANES_PER_WORD = 8 // DARE_LANE_DTYPE.itemsize


def name_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys derived from (seed, tensor name), the same in every process.

    Args:
        seed (`int`): The merge seed.
        name (`str`): The tensor's name (e.g. `model.layers.0.mlp.up_proj.weight`).

    Returns:
        `tuple[int, int]`: Two integers in [0, 2**32).
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def block_random_lanes(block: int, seed: int, name: str, count: int = DARE_BLOCK) -> np.ndarray:
    """The first `count` 16-bit random lanes of block `block` of tensor `name`.

    SFC64 seeded through a SeedSequence of (seed, name, block): both have version-stable
    output streams in NumPy. Lane `i` is bits 16*(i % 4) .. 16*(i % 4) + 15 of word i // 4
    (little-endian order on every machine). Generation happens on the CPU, so the lanes do
    not depend on the device the tensor lives on; a shorter `count` is a prefix of the block.

    Args:
        block (`int`): Block number (flat element index // DARE_BLOCK).
        seed (`int`): The merge seed.
        name (`str`): The tensor's name.
        count (`int`): How many lanes, at most DARE_BLOCK.

    Returns:
        `np.ndarray`: `count` uint16 values.
    """
    entropy = [*name_key(seed, name), block & 0xFFFFFFFF, block >> 32]
    words = np.random.SFC64(np.random.SeedSequence(entropy)).random_raw(
        -(-count // _LANES_PER_WORD)
    )
    return words.astype("<u8", copy=False).view(DARE_LANE_DTYPE)[:count]


def dare_threshold(density: float) -> int:
    """Lanes below this value are kept: `round(density * 2**16)`, kept within [1, 2**16 - 1].

    The keep probability `threshold / 2**16` is within 2**-16 of `density` (for density 0.8:
    0.8000031; for 0.01: 0.0099945).
    """
    return min(max(round(density * DARE_LEVELS), 1), DARE_LEVELS - 1)


def dare_keep_mask(
    shape: Sequence[int] | torch.Size,
    density: float,
    seed: int,
    name: str,
    start: int = 0,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DARE keep mask: each element kept with probability `density` (in steps of 2**-16).

    Element `i` (flat index in the full tensor) is kept iff its 16-bit random lane is below
    `dare_threshold(density)`; the lane depends only on (seed, name, i).

    Args:
        shape: Shape of the (slice of the) tensor.
        density (`float`): Probability of keeping an element, in (0, 1].
        seed (`int`): The merge seed.
        name (`str`): The tensor's name.
        start (`int`): Flat index, in the full tensor, of this slice's first element.
        device: Where the mask is returned.
        out (`torch.Tensor`, optional): A contiguous CPU bool buffer of at least the slice's
            size to fill (reused across calls, so no fresh pages are faulted in).

    Returns:
        `torch.Tensor`: Boolean mask of `shape`.
    """
    count = math.prod(int(size) for size in shape)
    if out is None:
        out = torch.empty(count, dtype=torch.bool)
    if out.numel() < count or out.dtype != torch.bool or out.device.type != "cpu":
        raise ValueError(f"out must be a CPU bool tensor of at least {count} elements")
    mask = out.view(-1)[:count]
    if density >= 1.0:
        return mask.fill_(True).view(tuple(shape)).to(device)
    threshold = np.uint16(dare_threshold(density))
    flat = mask.numpy()
    position = start
    while position < start + count:
        block, offset = divmod(position, DARE_BLOCK)
        take = min(DARE_BLOCK - offset, start + count - position)
        lanes = block_random_lanes(block, seed, name, offset + take)[offset:]
        np.less(lanes, threshold, out=flat[position - start : position - start + take])
        position += take
    return mask.view(tuple(shape)).to(device)


def dare_prune_(delta: torch.Tensor, mask: torch.Tensor, density: float) -> torch.Tensor:
    """DARE in place: rescale `delta` by 1/density and zero the elements not in `mask`.

    Multiplies by the mask (as PEFT's `random_pruning` does), so a NaN or Inf in a dropped
    element still makes the result non-finite instead of being hidden.

    Args:
        delta (`torch.Tensor`): The task vector, overwritten.
        mask (`torch.Tensor`): Boolean keep mask, same shape as `delta`.
        density (`float`): The keep probability the mask was drawn with.

    Returns:
        `torch.Tensor`: `delta`.
    """
    if density >= 1.0:
        return delta
    # A uint8 view multiplies several times faster than a bool mask or masked_fill_.
    return delta.div_(density).mul_(mask.view(torch.uint8))


def dare_prune(delta: torch.Tensor, mask: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: drop the elements not in `mask`, rescale the kept ones by 1/density.

    Args:
        delta (`torch.Tensor`): The task vector.
        mask (`torch.Tensor`): Boolean keep mask, same shape as `delta`.
        density (`float`): The keep probability the mask was drawn with.

    Returns:
        `torch.Tensor`: The pruned and rescaled delta (expected value equals `delta`), a new
        tensor unless density is 1.
    """
    if density >= 1.0:
        return delta
    return dare_prune_(delta.clone(), mask, density)


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the `int(density * numel)` largest-magnitude elements, zero the rest.

    Same definition as `peft.utils.merge_utils.magnitude_based_pruning`.

    Args:
        delta (`torch.Tensor`): The task vector.
        density (`float`): Fraction of elements to keep, in (0, 1].

    Returns:
        `torch.Tensor`: The trimmed delta.
    """
    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    k = int(density * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.topk(flat.abs(), k=k, largest=True, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros((), dtype=delta.dtype, device=delta.device)).reshape(
        delta.shape
    )


def majority_sign_mask(stacked: torch.Tensor) -> torch.Tensor:
    """TIES sign election over deltas stacked on dim 0: sign of the summed mass (ties → +).

    Same definition as `peft.utils.merge_utils.calculate_majority_sign_mask(method="total")`.

    Args:
        stacked (`torch.Tensor`): Deltas stacked on dimension 0.

    Returns:
        `torch.Tensor`: Boolean mask, True where an element agrees with the elected sign.
    """
    elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: sum of agreeing weighted deltas over how many agree (at least 1).

    Same definition as `peft.utils.merge_utils.disjoint_merge`.

    Args:
        weighted (`torch.Tensor`): Weighted deltas stacked on dimension 0.
        agree (`torch.Tensor`): Mask from `majority_sign_mask`.

    Returns:
        `torch.Tensor`: The merged delta.
    """
    total = (weighted * agree).sum(dim=0)
    return total / torch.clamp(agree.sum(dim=0), min=1.0)


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: `sum_i weights[i] * deltas[i]`.

    Args:
        deltas: Task vectors, all the same shape.
        weights: One weight per task vector.

    Returns:
        `torch.Tensor`: The combined delta.
    """
    if len(deltas) == 1:
        return deltas[0] if weights[0] == 1.0 else deltas[0] * weights[0]
    total = deltas[0] * weights[0]
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        total.add_(delta * weight)  # not add_(alpha=): that may fuse multiply-add on some devices
    return total


def combine_deltas(
    deltas: Sequence[torch.Tensor],
    *,
    method: str,
    weights: Sequence[float],
    density: float = 1.0,
    seed: int = 0,
    name: str = "",
    start: int = 0,
    masks: Sequence[torch.Tensor] | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """The delta operator M of a merge method applied to one or more task vectors.

    `linear`: weighted sum. `dare_linear`: DARE each delta (mask keyed by (seed, name, model
    index)), then weighted sum. `ties`: magnitude-trim each, elect sign, disjoint mean of the
    weighted deltas. `dare_ties`: DARE each, elect sign, disjoint mean.

    Args:
        deltas: Task vectors (tuned - base), all the same shape.
        method (`str`): One of `MERGE_METHODS`.
        weights: One weight per task vector.
        density (`float`): Keep fraction for DARE / TIES, in (0, 1].
        seed (`int`): Seed of the DARE masks.
        name (`str`): Tensor name, part of the DARE mask key.
        start (`int`): Flat index of this slice in the full tensor (DARE only; TIES needs the
            whole tensor because its top-k is global).
        masks (optional): The DARE keep masks, one per delta, as `dare_masks` draws them;
            drawn here when not given.
        inplace (`bool`): DARE may prune `deltas` in place (work buffers of the caller).

    Returns:
        `torch.Tensor`: The combined delta.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"got {len(deltas)} tuned tensors but {len(weights)} weights")
    spec = merge_method(method)
    if spec.draws_masks and density < 1.0:
        if masks is None:
            masks = dare_masks(deltas[0].numel(), density, seed, name, start, len(deltas))
        deltas = [
            dare_prune_(d if inplace else d.clone(), keep.to(d.device).view(d.shape), density)
            for d, keep in zip(deltas, masks, strict=True)
        ]
    elif spec.sparsification == "magnitude":
        deltas = [magnitude_prune(d, density) for d in deltas]
    if spec.consensus is None:
        return weighted_sum(deltas, weights)
    stacked = torch.stack(list(deltas), dim=0)
    agree = majority_sign_mask(stacked)
    weight_column = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * weight_column.view((-1,) + (1,) * (stacked.dim() - 1))
    return disjoint_mean(weighted, agree)


def dare_masks(
    count: int,
    density: float,
    seed: int,
    name: str,
    start: int = 0,
    models: int = 1,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The DARE keep masks of a flat slice for each of `models` tuned models.

    Model 0's mask is keyed by `name`, model i's by `name#i`, so every model drops different
    elements.

    Args:
        count (`int`): Elements in the slice.
        density, seed, name, start: As in `dare_keep_mask`.
        models (`int`): Number of tuned models.
        out (optional): One CPU bool buffer per model to fill (see `dare_keep_mask`).

    Returns:
        `list[torch.Tensor]`: Flat boolean masks on the CPU.
    """
    outs = list(out) if out is not None else [None] * models
    return [
        dare_keep_mask(
            (count,), density, seed, name if i == 0 else f"{name}#{i}", start, out=outs[i]
        )
        for i in range(models)
    ]


def merge_flat(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    *,
    method: str,
    ratio: float,
    density: float,
    seed: int,
    weights: Sequence[float],
    name: str,
    compute_dtype: torch.dtype,
    start: int = 0,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge a slice of a tensor: `base + ratio * M(tuned - base)`, in `base.dtype`.

    The slice begins at flat index `start` of the full tensor; elementwise methods give the
    same result for any slicing. `ties` needs the whole tensor (its top-k is global).
    The arithmetic is done in `compute_dtype` and rounded once to `base.dtype`.

    Args:
        base (`torch.Tensor`): Slice of the original weights.
        tuned: Matching slices of the tuned weights.
        method, ratio, density, seed, weights, name, compute_dtype: as in `merge_tensors`.
        start (`int`): Flat index of the slice's first element in the full tensor.
        out (`torch.Tensor`, optional): Where to write the result (dtype `base.dtype`).
        scratch (optional): Buffers from `new_scratch(n, len(tuned), ...)` with n at least
            the slice's size.
        masks (optional): The slice's DARE masks if already drawn (see `combine_deltas`).

    Returns:
        `torch.Tensor`: The merged slice.
    """
    count = base.numel()
    if scratch is None:
        scratch = new_scratch(count, len(tuned), compute_dtype, base.device)
    base_compute = scratch.base[:count].view(base.shape).copy_(base)
    deltas = [
        buffer[:count].view(base.shape).copy_(other).sub_(base_compute)
        for buffer, other in zip(scratch.deltas, tuned, strict=False)
    ]
    if masks is None and merge_method(method).draws_masks and density < 1.0:
        masks = dare_masks(count, density, seed, name, start, len(tuned), out=scratch.masks)
    delta = combine_deltas(
        deltas,
        method=method,
        weights=weights,
        density=density,
        seed=seed,
        name=name,
        start=start,
        masks=masks,
        inplace=True,
    )
    if out is None:
        out = torch.empty_like(base)
    return out.copy_(delta.mul_(ratio).add_(base_compute))


@dataclass
class Scratch:
    """Work buffers of `merge_flat`: the base and each delta (compute dtype, on the tensors'
    device) and each DARE mask (bool, on the CPU, where masks are drawn)."""

    base: torch.Tensor
    deltas: list[torch.Tensor]
    masks: list[torch.Tensor]


def new_scratch(count: int, models: int, dtype: torch.dtype, device) -> Scratch:
    """Work buffers for `merge_flat` over slices of up to `count` elements of `models` models.

    Reused across chunks because fresh multi-megabyte allocations are returned to the OS
    when freed, and faulting their pages back in costs more than the arithmetic.
    """
    return Scratch(
        base=torch.empty(count, dtype=dtype, device=device),
        deltas=[torch.empty(count, dtype=dtype, device=device) for _ in range(models)],
        masks=[torch.empty(count, dtype=torch.bool) for _ in range(models)],
    )


# Elements merged at a time by elementwise methods: small enough that the temporaries of one
# chunk stay in cache, large enough that per-call overhead is negligible.
MERGE_CHUNK = DARE_BLOCK


def merge_tensors(
    base: torch.Tensor,
    tuned: torch.Tensor | Sequence[torch.Tensor],
    *,
    method: str = "linear",
    ratio: float = 1.0,
    density: float = 1.0,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    name: str = "",
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Merge one tensor: `base + ratio * M(tuned - base)`, returned in `base.dtype`.

    Args:
        base (`torch.Tensor`): The original weights (theta0).
        tuned: The fine-tuned tensor, or a list of them (task arithmetic over their deltas).
        method (`str`): `linear`, `dare_linear`, `ties` or `dare_ties`.
        ratio (`float`): The merge ratio alpha.
        density (`float`): Keep fraction for DARE / TIES, in (0, 1].
        seed (`int`): Seed of the DARE mask.
        weights: One weight per tuned tensor; default 1.0 each.
        name (`str`): The tensor's name; with `seed` it fixes the DARE mask.
        compute_dtype (`torch.dtype`): Dtype the arithmetic is done in.

    Returns:
        `torch.Tensor`: The merged tensor (a new tensor; inputs are not modified).
    """
    from imm_trl.merging.config import check_density, check_method

    check_method(method)
    check_density(density)
    tuned_list = [tuned] if isinstance(tuned, torch.Tensor) else list(tuned)
    if not tuned_list:
        raise ValueError("merge_tensors needs at least one tuned tensor")
    for other in tuned_list:
        if other.shape != base.shape:
            raise ValueError(
                f"shape mismatch for {name or 'tensor'}: base {tuple(base.shape)}, "
                f"tuned {tuple(other.shape)}"
            )
    weights = [1.0] * len(tuned_list) if weights is None else [float(w) for w in weights]
    settings = dict(
        method=method,
        ratio=float(ratio),
        density=float(density),
        seed=seed,
        weights=weights,
        name=name,
        compute_dtype=compute_dtype,
    )
    if not merge_method(method).elementwise or base.numel() <= MERGE_CHUNK:
        return merge_flat(base, tuned_list, **settings)
    flat_base = base.reshape(-1)
    flat_tuned = [other.reshape(-1) for other in tuned_list]
    out = torch.empty_like(flat_base)
    scratch = new_scratch(MERGE_CHUNK, len(tuned_list), compute_dtype, base.device)
    for begin in range(0, flat_base.numel(), MERGE_CHUNK):
        end = min(begin + MERGE_CHUNK, flat_base.numel())
        merge_flat(
            flat_base[begin:end],
            [t[begin:end] for t in flat_tuned],
            start=begin,
            out=out[begin:end],
            scratch=scratch,
            **settings,
        )
    return out.reshape(base.shape)


def merge_into_(
    current: torch.Tensor,
    theta0: torch.Tensor,
    update: torch.Tensor | None = None,
    *,
    method: str = "linear",
    ratio: float = 1.0,
    density: float = 1.0,
    seed: int = 0,
    name: str = "",
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """In place: `current <- theta0 + ratio * M(current + update - theta0)`.

    The tuned tensor is `current + update` (for LoRA: G_{t-1} + dW), formed in
    `compute_dtype`. For the elementwise one-model methods (`linear`, `dare_linear`) the
    arithmetic runs in place (through reused work buffers, chunk by chunk, when `current` is
    in a narrower dtype), in the same order as
    `merge_tensors`, so the result is bit-identical to
    `merge_tensors(theta0, current + update)` without allocating tensor-sized temporaries;
    `ties` / `dare_ties` fall back to `merge_tensors`.

    Args:
        current (`torch.Tensor`): The weights to overwrite (G), contiguous.
        theta0 (`torch.Tensor`): The original weights, same shape.
        update (`torch.Tensor`, optional): Added to `current` to form the tuned tensor.
        method, ratio, density, seed, name, compute_dtype: As in `merge_tensors`.

    Returns:
        `torch.Tensor`: `current`.
    """
    theta0 = theta0.to(current.device)
    spec = merge_method(method)
    if not spec.in_place:
        tuned = (
            current.to(compute_dtype)
            if update is None
            else current.to(compute_dtype) + update.to(compute_dtype)
        )
        merged = merge_tensors(
            theta0.to(current.dtype),
            tuned,
            method=method,
            ratio=ratio,
            density=density,
            seed=seed,
            name=name,
            compute_dtype=compute_dtype,
        )
        return current.copy_(merged)
    if current.dtype == compute_dtype:
        # Already in the compute dtype: work on the tensor itself, a few whole-tensor ops.
        if update is not None:
            current.add_(update.to(compute_dtype))
        base = theta0.to(compute_dtype)
        current.sub_(base)
        if spec.draws_masks and density < 1.0:
            dare_prune_(
                current,
                dare_keep_mask(current.shape, density, seed, name, device=current.device),
                density,
            )
        return current.mul_(ratio).add_(base)
    flat = current.view(-1)
    flat_theta0 = theta0.reshape(-1)
    flat_update = update.reshape(-1) if update is not None else None
    count = flat.numel()
    chunk = min(MERGE_CHUNK, count)
    scratch = new_scratch(chunk, 2, compute_dtype, current.device)
    base_work, (work, update_work), mask_work = scratch.base, scratch.deltas, scratch.masks[0]
    for begin in range(0, count, chunk):
        end = min(begin + chunk, count)
        tuned = work[: end - begin].copy_(flat[begin:end])
        base = base_work[: end - begin].copy_(flat_theta0[begin:end])
        if flat_update is not None:
            tuned.add_(update_work[: end - begin].copy_(flat_update[begin:end]))
        tuned.sub_(base)
        if spec.draws_masks and density < 1.0:
            keep = dare_keep_mask(
                (end - begin,), density, seed, name, begin, current.device, out=mask_work
            )
            dare_prune_(tuned, keep, density)
        flat[begin:end].copy_(tuned.mul_(ratio).add_(base))
    return current


# Elements of one row block of `merge_low_rank_into_`. Each torch call holds the GIL for its
# Python-side work, so with one merge thread per core small blocks serialize the threads; large
# ones leave the cache. Measured on the 1.1B bf16 LoRA merge (2 cores, 2 threads), whole merge:
# 2^16 4.6 s, 2^18 2.4-2.7 s, 2^20 1.7-1.9 s, 2^21 1.8-1.9 s.
LOW_RANK_BLOCK = 1 << 20
# CPU GEMM kernels round differently for a product of a few rows (on AVX-512, fewer than 12 and
# not a multiple of 4 rows) than for the same rows inside a taller one: blocks are never that short.
MIN_BLOCK_ROWS = 64


def low_rank_block_rows(rows: int, columns: int) -> int:
    """Rows per block of `merge_low_rank_into_`: about LOW_RANK_BLOCK elements, the rows split
    evenly over the blocks so that the last one is not a short remainder."""
    blocks = -(-rows // max(MIN_BLOCK_ROWS, LOW_RANK_BLOCK // columns))
    return -(-rows // blocks)


def reusable_buffer(buffers: dict[str, torch.Tensor], role: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of `size` elements for `role`, taken from `buffers` (grown when too small)."""
    buffer = buffers.get(role)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = buffers[role] = torch.empty(size, dtype=dtype)
    return buffer[:size]


def merge_low_rank_into_(
    current: torch.Tensor,
    theta0: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    scaling: float,
    *,
    method: str = "linear",
    ratio: float = 1.0,
    density: float = 1.0,
    seed: int = 0,
    name: str = "",
    compute_dtype: torch.dtype = torch.float32,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """In place: `current <- theta0 + ratio * M(current + dW - theta0)`, dW = scaling * B @ A.

    The same result, bit for bit, as `merge_into_(current, theta0, dW)` with dW from PEFT's
    `get_delta_weight` on the CPU (the product in fp32, rounded to B's dtype), but formed one
    block of rows at a time in cache-sized buffers: dW is never written to memory as a whole
    tensor, and each weight is read and written once instead of once per elementwise pass.
    Operands in another dtype are converted into the buffers once per block (arithmetic with
    a mixed-dtype operand converts on every pass, which costs more than the copy).
    For `linear` and `dare_linear` on 2-D CPU tensors; the DARE mask is the one `merge_into_`
    draws (it is indexed by flat element position).

    Args:
        current (`torch.Tensor`): The weights to overwrite (G), contiguous, rows x columns.
        theta0 (`torch.Tensor`): The original weights, same shape.
        lora_b (`torch.Tensor`): B, rows x rank.
        lora_a (`torch.Tensor`): A, rank x columns.
        scaling (`float`): The adapter's scaling (lora_alpha / r, or rsLoRA's).
        method, ratio, density, seed, name, compute_dtype: As in `merge_tensors`.
        buffers (`dict`, optional): Work buffers by role, reused across calls (one dict per
            thread): freed multi-megabyte buffers go back to the OS, and faulting fresh ones
            in for every tensor costs more than the arithmetic.

    Returns:
        `torch.Tensor`: `current`.
    """
    rows, columns = current.shape
    block_rows = low_rank_block_rows(rows, columns)
    size = block_rows * columns
    a = lora_a.to(compute_dtype)
    b = lora_b.to(compute_dtype)
    buffers = {} if buffers is None else buffers
    work_buffer = reusable_buffer(buffers, "work", size, compute_dtype)
    current_buffer = reusable_buffer(buffers, "current", size, compute_dtype) if current.dtype != compute_dtype else None
    theta0_buffer = reusable_buffer(buffers, "theta0", size, compute_dtype) if theta0.dtype != compute_dtype else None
    prune = merge_method(method).draws_masks and density < 1.0
    mask_buffer = reusable_buffer(buffers, "mask", size, torch.bool) if prune else None

    def in_compute_dtype(tensor: torch.Tensor, buffer: torch.Tensor | None, count: int) -> torch.Tensor:
        return tensor if buffer is None else buffer[:count].view(tensor.shape).copy_(tensor)

    for begin in range(0, rows, block_rows):
        end = min(begin + block_rows, rows)
        count = (end - begin) * columns
        work = work_buffer[:count].view(end - begin, columns)
        # PEFT's own operations: addmm's alpha is folded in before the sum on some CPUs (AVX-512)
        torch.mm(b[begin:end], a, out=work).mul_(scaling)
        if lora_b.dtype != compute_dtype:  # PEFT returns dW in the adapter's dtype
            work.copy_(work.to(lora_b.dtype))
        base = in_compute_dtype(theta0[begin:end], theta0_buffer, count)
        work.add_(in_compute_dtype(current[begin:end], current_buffer, count)).sub_(base)
        if prune:
            keep = dare_keep_mask(work.shape, density, seed, name, begin * columns, out=mask_buffer)
            dare_prune_(work, keep, density)
        current[begin:end].copy_(work.mul_(ratio).add_(base))
    return current
