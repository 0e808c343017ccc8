"""Reading and writing checkpoints one tensor at a time.

The reader parses safetensors headers and reads each tensor with `os.pread` into its own
buffer (no memory map: mapped pages count towards the process's resident memory, so a merge
that maps two whole models would look as large as they are). The writer knows every
tensor's dtype and shape in advance, so it writes the header first and then streams tensor
bytes as they are produced; memory stays bounded by a few tensors, never a shard.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_FILE_NAMES = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, from its header only."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(
            name=name,
            dtype=SAFETENSORS_DTYPES[entry["dtype"]],
            shape=tuple(entry["shape"]),
            path=path,
            begin=8 + header_size + begin,
            nbytes=end - begin,
        )
    return infos


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (from its index if there is one)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / shard for shard in weight_map.values()})
    return sorted(model_dir.glob("*.safetensors"))


def pickle_files(model_dir: Path) -> list[Path]:
    """Pickle-format weight files (`*.bin`, `*.pt`, `*.pth`) of a model directory."""
    return sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)


class CheckpointReader:
    """Reads the tensors of a model directory one at a time.

    Safetensors are read with `pread`. Pickle-only checkpoints are refused unless
    `allow_pickle=True`, and then loaded with `torch.load(weights_only=True, mmap=True)`,
    which refuses arbitrary Python objects.
    """

    def __init__(self, model_dir: str | os.PathLike, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.model_dir} does not exist")
        self._infos: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._handles: dict[Path, int] = {}
        self._handles_lock = threading.Lock()  # merges read tensors from several threads
        shards = safetensors_files(self.model_dir)
        if shards:
            for shard in shards:
                self._infos.update(read_safetensors_header(shard))
            return
        pickled = pickle_files(self.model_dir)
        if not pickled:
            raise FileNotFoundError(
                f"{self.model_dir} has no *.safetensors (or *.bin) weight files"
            )
        if not allow_pickle:
            raise ValueError(
                f"{self.model_dir} holds only pickle weight files ({', '.join(p.name for p in pickled)}); "
                "unpickling can run arbitrary code, so they are refused. Convert them to safetensors, "
                "or opt in with allow_pickle=True (CLI: --allow-pickle) to load them with "
                "torch.load(weights_only=True)."
            )
        for path in pickled:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._pickled.update(state)

    def names(self) -> list[str]:
        """Tensor names, in file order."""
        if self._pickled:
            return list(self._pickled)
        return sorted(self._infos, key=lambda n: (str(self._infos[n].path), self._infos[n].begin))

    def dtype_and_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Dtype and shape of tensor `name`, without reading it."""
        if self._pickled:
            tensor = self._pickled[name]
            return tensor.dtype, tuple(tensor.shape)
        info = self._infos[name]
        return info.dtype, info.shape

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, in a buffer of its own."""
        if self._pickled:
            return self._pickled[name].clone()
        info = self._infos[name]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        done = 0
        fd = self._fd(info.path)
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.begin + done)
            if got == 0:
                raise OSError(f"{info.path} is truncated at tensor {name!r}")
            done += got
        return raw.view(info.dtype).reshape(info.shape)

    def read_range_into(self, name: str, start: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements start..start+len of tensor `name` (flattened), read into `buffer` (a
        tensor of the tensor's dtype, reused by the caller); returns `buffer`."""
        if self._pickled:
            return buffer.copy_(self._pickled[name].reshape(-1)[start : start + buffer.numel()])
        info = self._infos[name]
        view = memoryview(buffer.view(torch.uint8).numpy())
        offset = info.begin + start * buffer.element_size()
        done = 0
        fd = self._fd(info.path)
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{info.path} is truncated at tensor {name!r}")
            done += got
        return buffer

    def _fd(self, path: Path) -> int:
        with self._handles_lock:
            if path not in self._handles:
                self._handles[path] = os.open(path, os.O_RDONLY)
            return self._handles[path]

    def close(self) -> None:
        """Close the open files."""
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: name, dtype and shape known before its values."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(
    tensors: Iterable[PlannedTensor], max_shard_bytes: int
) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [shard for shard in shards if shard] or [[]]


def shard_file_names(count: int) -> list[str]:
    """HF's names: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(shard: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included) of a shard, padded to 8-byte alignment."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedSafetensorsWriter:
    """Writes planned tensors into sharded safetensors files, one tensor at a time, in plan
    order, then the index. `write` must be called in the planned order."""

    def __init__(
        self, out_dir: Path, planned: list[PlannedTensor], max_shard_bytes: int, fsync: bool = True
    ):
        self.out_dir = out_dir
        self.shards = plan_shards(planned, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self.fsync = fsync
        self._order: Iterator[tuple[int, PlannedTensor]] = (
            (i, tensor) for i, shard in enumerate(self.shards) for tensor in shard
        )
        self._current_shard = -1
        self._handle = None
        self._planned: PlannedTensor | None = None
        self._remaining = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor `name`, or the next consecutive piece of it (flattened). Tensors must
        come in planned order, each complete before the next begins."""
        if self._remaining == 0:
            shard_index, self._planned = next(self._order)
            self._remaining = self._planned.nbytes
            if shard_index != self._current_shard:
                self._open_shard(shard_index)
        planned = self._planned
        nbytes = tensor.numel() * tensor.element_size()
        if planned.name != name or planned.dtype != tensor.dtype or nbytes > self._remaining:
            raise RuntimeError(
                f"writer expected (part of) {planned}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if nbytes:
            self._handle.write(
                memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            )
        self._remaining -= nbytes

    def _open_shard(self, shard_index: int) -> None:
        self._close_shard()
        self._current_shard = shard_index
        self._handle = open(self.out_dir / self.file_names[shard_index], "wb", buffering=1 << 22)
        self._handle.write(safetensors_header(self.shards[shard_index], {"format": "pt"}))

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self.fsync:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def finish(self) -> None:
        """Close the last shard (opening empty ones never written) and write the index."""
        if self._remaining or next(self._order, None) is not None:
            raise RuntimeError("finish() called before every planned tensor was written")
        for shard_index in range(self._current_shard + 1, len(self.shards)):
            self._open_shard(shard_index)
        self._close_shard()
        if len(self.shards) > 1:
            weight_map = {
                tensor.name: self.file_names[i]
                for i, shard in enumerate(self.shards)
                for tensor in shard
            }
            total = sum(tensor.nbytes for shard in self.shards for tensor in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
