"""Several processes (`accelerate launch`): each samples its share of the prompts.

Every process holds the same merged model (the merge is deterministic: DARE masks are keyed by
seed and tensor name, and adapter re-initialisation is seeded), so each can generate for a
slice of the prompts; the completions are then gathered so that every process sees the same
completions in prompt order, verifies them the same way and builds the same D_t. The
trainer's own distributed sampler then splits D_t across processes for training.

Where the parameters are sharded (ZeRO-3, FSDP2), `whole_parameters` gathers them for the
merge, so that the mergers always work on whole tensors and the result is the single-process
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from imm_trl.sampling.base import Prompt, SamplerBase, SamplingParams, as_sampler


def shard_indices(count: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices process `rank` generates for: every `world_size`-th one, so that long
    and short prompts spread evenly."""
    return list(range(rank, count, world_size))


def unshard(per_rank: Sequence[Sequence], count: int) -> list:
    """Inverse of `shard_indices`: the items of every rank, back in prompt order."""
    ordered = [None] * count
    for rank, items in enumerate(per_rank):
        for index, item in zip(shard_indices(count, rank, len(per_rank)), items, strict=True):
            ordered[index] = item
    return ordered


class ShardedSampler(SamplerBase):
    """A `Sampler` that generates for this process's share of the prompts and gathers the rest.

    Args:
        sampler: This process's sampler (over its copy of the merged model).
        accelerator: The trainer's `Accelerator` (rank, world size, gathering).
    """

    def __init__(self, sampler, accelerator):
        self.sampler = as_sampler(sampler)
        self.accelerator = accelerator

    def __getattr__(self, name):  # stats, restart, ... of the wrapped sampler
        return getattr(self.sampler, name)

    @property
    def needs_weight_updates(self) -> bool:
        return self.sampler.needs_weight_updates

    def update_weights(self, weights) -> float:
        return self.sampler.update_weights(weights)

    def close(self) -> None:
        self.sampler.close()

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        from accelerate.utils import gather_object

        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        mine = [prompts[i] for i in shard_indices(len(prompts), rank, world_size)]
        # Different seeds per process, or prompt i on rank 0 and prompt j on rank 1 would be
        # sampled with the same random stream.
        seed = None if params.seed is None else params.seed * world_size + rank
        completions = self.sampler.generate(mine, n, replace(params, seed=seed)) if mine else []
        per_rank = gather_object([completions])
        return unshard(per_rank, len(prompts))


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (an FSDP2-sharded parameter);
    by type name, so that no torch.distributed module is imported where none is in use."""
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def dtensor_slots(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, attribute, parameter) for every DTensor parameter registration of `model`; a
    parameter registered in several modules (tied weights) appears once per module."""
    return [
        (module, name, param)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False)
        if is_dtensor(param)
    ]


def write_shard_(sharded: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's shard of `full` into the local tensor of the DTensor `sharded`.

    `distribute_tensor` scatters rank 0's `full` with the DTensor's own mesh and placements,
    so every process ends with its shard of the same tensor even if the processes' copies of
    `full` were to differ (as ZeRO-3 keeps rank 0's result); any placements work (FSDP2's
    Shard(0), HSDP's (Replicate, Shard), ...). `to_local()` is a view of the shard's storage.
    """
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(full.to(sharded.dtype), sharded.device_mesh, sharded.placements)
    sharded.to_local().copy_(shard.to_local())


@contextmanager
def whole_dtensor_parameters(model: nn.Module, modify: bool = True):
    """Swap every DTensor parameter of `model` for a plain `Parameter` holding its full tensor,
    and back on exit, writing the (merged) full tensors back into the shards when `modify`.

    The mergers then see whole weights exactly as in one process: theta0 is captured from full
    tensors, DARE masks are drawn for full tensors by (seed, name), TIES takes its global
    top-k, and `LoraMerger` forms B @ A and re-initialises the adapter on whole factors, so the
    result is bit-identical to an unsharded merge. One full tensor is made per shared
    `Parameter` (tied weights stay tied). The cost is memory: inside the context every process
    holds the whole model once more, and a merger built inside it keeps a whole theta0 per
    process (`FullWeightMerger(theta0_dir=...)` keeps none). Nothing may run the model's
    forward inside: FSDP2's hooks would register their own unsharded parameters over the swapped
    ones. Parameters offloaded to the CPU under a GPU mesh (`CPUOffloadPolicy`) are not handled
    (the all-gather would run on CPU tensors over NCCL). On an exception the shards are left as
    they were.
    """
    slots = dtensor_slots(model)
    whole: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for _, _, sharded in slots:
            if id(sharded) not in whole:
                whole[id(sharded)] = nn.Parameter(
                    sharded.full_tensor(), requires_grad=sharded.requires_grad
                )
    for module, name, sharded in slots:
        setattr(module, name, whole[id(sharded)])
    try:
        yield
    finally:
        for module, name, sharded in slots:
            setattr(module, name, sharded)
    if modify:
        with torch.no_grad():
            shards = {id(sharded): sharded for _, _, sharded in slots}
            for key, sharded in shards.items():
                write_shard_(sharded, whole[key].detach())


@contextmanager
def whole_parameters(model, modify: bool = True):
    """Make every parameter whole for the duration of a merge (or of capturing theta0, or of
    reading the weights to save them).

    DDP and ZeRO-1/2 keep whole parameters on every process: nothing to do. ZeRO-3 partitions
    them; they are gathered (DeepSpeed `GatheredParameters`), merged identically on every
    process, and rank 0's result is re-partitioned on exit. FSDP2 shards them as DTensors;
    each is all-gathered into a plain full `Parameter` swapped into its module, merged the same
    way on every process, and on exit rank 0's result is scattered back into every process's
    shard (`whole_dtensor_parameters`; costs one extra full copy of the model per process while
    inside). `modify=False` reads only: nothing is written back. Every process must enter
    (gathering is collective). FSDP2 is tested on CPU (gloo) by tests/test_fsdp2.py; ZeRO-3
    needs GPUs and `deepspeed`, and is not exercised here.
    """
    params = list(model.parameters())
    if any(is_dtensor(p) for p in params):
        with whole_dtensor_parameters(model, modify=modify):
            yield
        return
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
