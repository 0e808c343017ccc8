"""`merge_checkpoints`: merge model directories on disk, one tensor at a time.

Never holds a whole model, nor even a whole tensor: each tensor is read from the base and
tuned checkpoints in fixed-size pieces, merged, checked for NaN/Inf and streamed into the
output shard (mergekit's lazy-loader idea, one level finer). Elementwise methods give the same
result piece by piece because DARE masks depend only on each element's index; TIES, whose
top-k is global, reads whole tensors. Reading the next piece and writing the previous one
overlap with the merge of the current one.
The output is built in a hidden sibling directory and renamed into place only when complete,
so an interrupted merge never leaves a directory that looks like a model.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from imm_trl.files import publish_directory, remove_stale_staging, staging_directory
from imm_trl.merging.config import (
    MergeConfig,
    Ratio,
    RatioMap,
    check_ratio_patterns,
    merge_method,
    parse_ratio,
)
from imm_trl.merging.functional import (
    MERGE_CHUNK,
    Scratch,
    dare_masks,
    merge_flat,
    merge_tensors,
    new_scratch,
)
from imm_trl.merging.io import (
    PICKLE_WEIGHT_SUFFIXES,
    CheckpointReader,
    PlannedTensor,
    ShardedSafetensorsWriter,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Config keys that must agree for two checkpoints to be the same architecture.
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)
# Elements streamed per piece (a multiple of the DARE mask block) and pieces in flight
# (one being read, one merged, one written): memory is bounded by these, not by tensor size.
STREAM_CHUNK = 8 * MERGE_CHUNK
IN_FLIGHT = 3


def merge_checkpoints(
    base_dir: str | os.PathLike,
    tuned_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    method: str = "linear",
    ratio: Ratio | RatioMap = 1.0,
    density: float = 1.0,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    overwrite: bool = False,
    fsync: bool = True,
) -> Path:
    """Merge checkpoints on disk: `out = base + ratio * M(tuned - base)`, tensor by tensor.

    Args:
        base_dir: The original model (theta0), a Hugging Face model directory.
        tuned_dirs: One tuned model directory or a list (task arithmetic over their deltas).
        out_dir: Where the merged model goes; must not exist unless `overwrite`.
        method, ratio, density, seed, weights: As in `merge_tensors`; `ratio` may be a
            per-layer map.
        compute_dtype: Dtype of the arithmetic; outputs keep the base's dtypes.
        max_shard_bytes: Largest output shard.
        allow_pickle: Accept pickle-only checkpoints, loaded with `torch.load(weights_only=True)`.
        overwrite: Replace an existing `out_dir` (only once the new one is complete).
        fsync: Flush files to disk before the final rename.

    Returns:
        `Path`: The output directory.
    """
    config = MergeConfig(
        method=method,
        ratio=ratio,
        density=density,
        seed=seed,
        weights=None if weights is None else [float(w) for w in weights],
        compute_dtype=str(compute_dtype).removeprefix("torch."),
    )
    ratio_map = parse_ratio(config.ratio)  # one ratio (or map) for every tensor, no schedule
    base_dir = Path(base_dir)
    tuned_list = (
        [Path(tuned_dirs)]
        if isinstance(tuned_dirs, (str, os.PathLike))
        else [Path(p) for p in tuned_dirs]
    )
    if not tuned_list:
        raise ValueError("merge_checkpoints needs at least one tuned checkpoint directory")
    if weights is not None and len(weights) != len(tuned_list):
        raise ValueError(
            f"got {len(weights)} weights for {len(tuned_list)} tuned checkpoints; give one per checkpoint"
        )
    out_dir = Path(out_dir)
    check_output_apart(out_dir, [base_dir, *tuned_list])
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {out_dir} exists; choose another or pass overwrite=True (CLI: --overwrite)"
        )
    for tuned in tuned_list:
        check_same_architecture(base_dir, tuned)

    base = CheckpointReader(base_dir, allow_pickle=allow_pickle)
    tuned_readers = [CheckpointReader(p, allow_pickle=allow_pickle) for p in tuned_list]
    try:
        planned = plan_merge(base, tuned_readers, tuned_list)
        check_ratio_patterns(ratio_map, [t.name for t in planned], f"checkpoint {base_dir}")
        remove_stale_staging(out_dir.parent)
        with staging_directory(out_dir) as staging:
            writer = ShardedSafetensorsWriter(staging, planned, max_shard_bytes, fsync=fsync)
            stream_merge(base, tuned_readers, planned, writer, ratio_map, config)
            writer.finish()
            copy_model_files(base_dir, staging)
            if out_dir.exists() and not overwrite:
                raise FileExistsError(
                    f"output directory {out_dir} appeared during the merge; not replacing it"
                )
            publish_directory(staging, out_dir, fsync=fsync)
    finally:
        base.close()
        for reader in tuned_readers:
            reader.close()
    return out_dir


def check_output_apart(out_dir: Path, inputs: Sequence[Path]) -> None:
    """Raise a ValueError if `out_dir` is, is inside, or contains an input directory (real
    paths, symlinks resolved): writing there, `overwrite` or not, would destroy an input."""
    out = out_dir.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if out == real or real in out.parents or out in real.parents:
            relation = "is" if out == real else "is inside" if real in out.parents else "contains"
            shown = f"{source} ({real})" if real != Path(source).absolute() else str(source)
            raise ValueError(
                f"output directory {out_dir} {relation} the input {shown}; a merge "
                "never writes into, over or above its inputs, even with overwrite: choose an "
                "output directory outside them"
            )


def read_config(model_dir: Path) -> dict | None:
    """The model's config.json, or None if it has none."""
    path = model_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_same_architecture(base_dir: Path, tuned_dir: Path) -> None:
    """Raise a ValueError if both configs exist and disagree on an architecture key."""
    base_config, tuned_config = read_config(base_dir), read_config(tuned_dir)
    if base_config is None or tuned_config is None:
        return
    differing = [
        f"{key}: {base_config.get(key)!r} vs {tuned_config.get(key)!r}"
        for key in ARCHITECTURE_KEYS
        if base_config.get(key) != tuned_config.get(key)
    ]
    if differing:
        raise ValueError(
            f"{base_dir} and {tuned_dir} are different architectures ({'; '.join(differing)}); "
            "merging needs the tuned model to be a fine-tune of the base"
        )


def plan_merge(
    base: CheckpointReader, tuned: list[CheckpointReader], tuned_dirs: list[Path]
) -> list[PlannedTensor]:
    """The output tensors (base's names, dtypes and shapes), after checking that every tuned
    checkpoint has exactly the same tensors with the same shapes and dtypes."""
    base_names = base.names()
    base_set = set(base_names)
    for reader, directory in zip(tuned, tuned_dirs, strict=True):
        names = set(reader.names())
        missing, extra = sorted(base_set - names), sorted(names - base_set)
        if missing or extra:
            raise ValueError(
                f"{directory} does not have the base model's tensors: "
                f"missing {_few(missing)}, extra {_few(extra)}; both must be full checkpoints of "
                "the same architecture (merge a LoRA adapter with merge_and_unload first)"
            )
        for name in base_names:
            base_dtype, base_shape = base.dtype_and_shape(name)
            dtype, shape = reader.dtype_and_shape(name)
            if shape != base_shape:
                raise ValueError(
                    f"shape mismatch for {name}: base {base_shape}, {directory} {shape}"
                )
            if dtype != base_dtype:
                raise ValueError(
                    f"dtype mismatch for {name}: base {base_dtype}, {directory} {dtype}; save both "
                    "checkpoints in the same dtype (e.g. model.to(torch.bfloat16).save_pretrained)"
                )
    return [PlannedTensor(name, *base.dtype_and_shape(name)) for name in base_names]


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def merge_one(
    name: str, base: torch.Tensor, tuned: list[torch.Tensor], ratio: float, config: MergeConfig
) -> torch.Tensor:
    """Merge one tensor read from disk and refuse a non-finite result."""
    if not base.is_floating_point():
        if any(not torch.equal(base, other) for other in tuned):
            raise ValueError(
                f"integer tensor {name} differs between checkpoints; it cannot be merged"
            )
        return base
    merged = merge_tensors(
        base, tuned, ratio=ratio, name=name, weights=config.weights, **config.kernel_kwargs()
    )
    _refuse_non_finite(name, merged)
    return merged


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one tensor to merge: elements [start, start + count) of its flat view, or
    the whole tensor (`whole`) for methods that need it (TIES) and non-float tensors."""

    tensor: PlannedTensor
    start: int
    count: int
    whole: bool


def plan_units(
    planned: list[PlannedTensor], method: str, chunk: int = STREAM_CHUNK
) -> list[WorkUnit]:
    """Split every tensor into streamable pieces of at most `chunk` elements."""
    units = []
    for tensor in planned:
        numel = math.prod(tensor.shape)
        if not merge_method(method).elementwise or not tensor.dtype.is_floating_point:
            units.append(WorkUnit(tensor, 0, numel, whole=True))
            continue
        units.extend(
            WorkUnit(tensor, start, min(chunk, numel - start), whole=False)
            for start in range(0, numel, chunk)
        )
    return units


class BufferSet:
    """Reused buffers for one in-flight piece: base, each tuned model, the output, and each
    tuned model's DARE mask."""

    def __init__(self, models: int):
        self.raw = [torch.empty(0, dtype=torch.uint8) for _ in range(models + 2)]
        self.masks = [torch.empty(0, dtype=torch.bool) for _ in range(models)]

    def views(self, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        size = count * torch.empty((), dtype=dtype).element_size()
        for i, raw in enumerate(self.raw):
            if raw.numel() < size:
                self.raw[i] = torch.empty(size, dtype=torch.uint8)
        return [raw[:size].view(dtype) for raw in self.raw]

    def mask_views(self, count: int) -> list[torch.Tensor]:
        for i, mask in enumerate(self.masks):
            if mask.numel() < count:
                self.masks[i] = torch.empty(count, dtype=torch.bool)
        return [mask[:count] for mask in self.masks]


def stream_merge(
    base: CheckpointReader,
    tuned: list[CheckpointReader],
    planned: list[PlannedTensor],
    writer: ShardedSafetensorsWriter,
    ratio_map: RatioMap,
    config: MergeConfig,
) -> None:
    """Read, merge and write every tensor in pieces of STREAM_CHUNK elements through a few
    reused buffers; the next read (with the drawing of its DARE masks) and the previous write
    run in background threads while the current piece is merged. Memory: IN_FLIGHT buffer
    sets (plus whole tensors for TIES)."""
    units = plan_units(planned, config.method)
    free: queue.Queue[BufferSet] = queue.Queue()
    for _ in range(IN_FLIGHT):
        free.put(BufferSet(len(tuned)))
    stop = threading.Event()
    scratch = new_scratch(MERGE_CHUNK, len(tuned), config.torch_compute_dtype, "cpu")

    def take_buffers() -> BufferSet:
        while True:
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise RuntimeError("merge aborted") from None

    draws_masks = merge_method(config.method).draws_masks and config.density < 1.0

    def read(unit: WorkUnit):
        name = unit.tensor.name
        if unit.whole:
            return None, base.read(name), [reader.read(name) for reader in tuned], None
        buffers = take_buffers()
        base_buffer, *tuned_buffers, _ = buffers.views(unit.tensor.dtype, unit.count)
        base.read_range_into(name, unit.start, base_buffer)
        for reader, buffer in zip(tuned, tuned_buffers, strict=True):
            reader.read_range_into(name, unit.start, buffer)
        masks = None
        if draws_masks:  # NumPy draws them without the GIL, beside the merge of the last piece
            masks = dare_masks(
                unit.count,
                config.density,
                config.seed,
                name,
                unit.start,
                len(tuned),
                out=buffers.mask_views(unit.count),
            )
        return buffers, base_buffer, tuned_buffers, masks

    def write(unit: WorkUnit, merged: torch.Tensor, buffers: BufferSet | None) -> None:
        writer.write(unit.tensor.name, merged)
        if buffers is not None:
            free.put(buffers)

    with (
        ThreadPoolExecutor(max_workers=1) as reader_pool,
        ThreadPoolExecutor(max_workers=1) as writer_pool,
    ):
        try:
            pending_write: Future | None = None
            next_read = reader_pool.submit(read, units[0]) if units else None
            for position, unit in enumerate(units):
                buffers, base_piece, tuned_pieces, masks = next_read.result()
                if position + 1 < len(units):
                    next_read = reader_pool.submit(read, units[position + 1])
                ratio = ratio_map.ratio_for(unit.tensor.name)
                if unit.whole:
                    merged = merge_one(unit.tensor.name, base_piece, tuned_pieces, ratio, config)
                else:
                    out = buffers.views(unit.tensor.dtype, unit.count)[-1]
                    merged = merge_piece(
                        unit, base_piece, tuned_pieces, out, ratio, config, scratch, masks
                    )
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer_pool.submit(write, unit, merged, buffers)
            if pending_write is not None:
                pending_write.result()
        except BaseException:
            stop.set()
            raise


def merge_piece(
    unit: WorkUnit,
    base: torch.Tensor,
    tuned: list[torch.Tensor],
    out: torch.Tensor,
    ratio: float,
    config: MergeConfig,
    scratch: Scratch,
    masks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge one streamed piece (elementwise methods) into `out` and refuse NaN/Inf; `masks`
    are the piece's DARE masks when already drawn."""
    weights = [1.0] * len(tuned) if config.weights is None else config.weights
    for begin in range(0, unit.count, MERGE_CHUNK):
        end = min(begin + MERGE_CHUNK, unit.count)
        merge_flat(
            base[begin:end],
            [t[begin:end] for t in tuned],
            ratio=ratio,
            weights=weights,
            name=unit.tensor.name,
            **config.kernel_kwargs(),
            start=unit.start + begin,
            out=out[begin:end],
            scratch=scratch,
            masks=None if masks is None else [mask[begin:end] for mask in masks],
        )
    _refuse_non_finite(unit.tensor.name, out)
    return out


def _refuse_non_finite(name: str, merged: torch.Tensor) -> None:
    # min and max propagate NaN and are +-Inf if any element is: one exact pass that
    # allocates nothing (a float32 sum of a bf16 tensor would first copy it to float32).
    if merged.element_size() == 1:  # float8: no aminmax kernel
        merged = merged.float()
    if merged.numel() and not torch.isfinite(torch.stack(torch.aminmax(merged))).all():
        raise ValueError(
            f"the merged tensor {name} contains NaN or Inf (check the inputs for NaN/Inf and the "
            "ratio for overflow in the output dtype); nothing was written"
        )


def copy_model_files(base_dir: Path, out_dir: Path) -> None:
    """Copy config, generation config, tokenizer and other small files (not weights)."""
    for path in base_dir.iterdir():
        if (
            not path.is_file()
            or path.suffix == ".safetensors"
            or path.suffix in PICKLE_WEIGHT_SUFFIXES
        ):
            continue
        if path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out_dir / path.name)
