"""Several processes (`accelerate launch`): each samples its share of the prompts.

Every process holds the same merged model (the merge is deterministic: DARE masks are keyed by
seed and tensor name, and adapter re-initialisation is seeded), so each can generate for a
slice of the prompts; the completions are then gathered so that every process sees the same
completions in prompt order, verifies them the same way and builds the same D_t. The
trainer's own distributed sampler then splits D_t across processes for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

from imm_trl.sampling.base import Prompt, SamplingParams


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


class ShardedSampler:
    """A `Sampler` that generates for this process's share of the prompts and gathers the rest.

    Args:
        sampler: This process's sampler (over its copy of the merged model).
        accelerator: The trainer's `Accelerator` (rank, world size, gathering).
    """

    def __init__(self, sampler, accelerator):
        self.sampler = sampler
        self.accelerator = accelerator

    def __getattr__(self, name):  # update_weights, stats, close ... of the wrapped sampler
        return getattr(self.sampler, name)

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


@contextmanager
def whole_parameters(model):
    """Make every parameter whole for the duration of a merge (or of capturing theta0).

    DDP and ZeRO-1/2 keep whole parameters on every process: nothing to do. ZeRO-3 partitions
    them; they are gathered (DeepSpeed `GatheredParameters`), merged identically on every
    process, and rank 0's result is re-partitioned on exit. FSDP2 shards them as DTensors,
    which the in-place mergers do not handle yet: refused with a clear error rather than a
    merge of one shard as if it were the whole weight. Neither path is exercised on a CPU
    machine; both need GPUs (and `deepspeed` for ZeRO-3).
    """
    params = list(model.parameters())
    if any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in params):
        raise NotImplementedError(
            "IMM merges under FSDP2 (DTensor-sharded parameters) are not implemented; use DDP, "
            "ZeRO-2 or ZeRO-3 (recipes/accelerate_configs/)"
        )
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield
