"""safetensors files: a validating header reader, a one-tensor reader and a streaming writer.

Layout (huggingface/safetensors docs): u64 little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the byte
buffer; offsets are relative to the buffer. The reader checks every offset against the file size before
any tensor is touched, so a truncated download fails with one line naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from cpmkit.errors import CpmkitError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_ALIGN = 8  # the reference writer pads the JSON with spaces to this boundary
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of ``path``; returns the tensor entries and ``__metadata__``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CpmkitError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise CpmkitError(f"{path}: header length {n} points past the end of the file ({size} bytes); "
                              "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CpmkitError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CpmkitError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, base, size)
    return entries, metadata


def _entry(path: Path, name: str, info: object, base: int, size: int) -> TensorEntry:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CpmkitError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if dtype_name not in DTYPES:
        raise CpmkitError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if not (0 <= begin <= end) or end - begin != expected:
        raise CpmkitError(f"{path}: tensor {name!r} spans {end - begin} bytes but dtype {dtype_name} and "
                          f"shape {list(shape)} need {expected}")
    if base + end > size:
        raise CpmkitError(f"{path}: tensor {name!r} ends at byte {base + end} but the file has {size} bytes; "
                          "the file is truncated")
    return TensorEntry(name, dtype, shape, base + begin, base + end)


def read_tensor(path: Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into its own memory (nothing else of the file stays resident)."""
    raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(entry.begin)
        if f.readinto(raw.numpy()) != raw.numel():
            raise CpmkitError(f"{path}: tensor {entry.name!r} could not be read whole; the file changed or is "
                              "truncated")
    return raw.view(entry.dtype).reshape(entry.shape)


class StreamingWriter:
    """Writes a safetensors file one tensor at a time: the header is fixed up front from the declared
    names, dtypes and shapes, then each tensor is written in that order and may be freed at once.
    Writes to ``path`` directly; callers write into a temporary folder and rename it when complete."""

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % _HEADER_ALIGN)
        self._file: BinaryIO = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self.path = path

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self._order[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want_name} {dtype} {list(shape)} next, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        self._file.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        missing = [n for n, _, _ in self._order[self._next :]]
        self._file.close()
        if missing:
            raise ValueError(f"{self.path}: closed before writing {missing[0]} ({len(missing)} missing)")

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a folder of safetensors files lives; read on demand."""

    file: Path
    entry: TensorEntry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    def read(self) -> torch.Tensor:
        return read_tensor(self.file, self.entry)


def index_folder(folder: Path, patterns: tuple[str, ...], what: str) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors files in ``folder`` matching ``patterns``, by name (each header
    checked); ``what`` names the folder kind in the error when there are none."""
    files = sorted({f for pattern in patterns for f in folder.glob(pattern)})
    if not files:
        raise CpmkitError(f"{folder}: no {' or '.join(patterns)} files; not {what}")
    found: dict[str, StoredTensor] = {}
    for file in files:
        entries, _ = read_header(file)
        for name, entry in entries.items():
            if name in found:
                raise CpmkitError(f"{file}: tensor {name} is also in {found[name].file.name}")
            found[name] = StoredTensor(file, entry)
    return found


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a sharded folder, declared before writing. ``parameters`` is its count of logical weights
    (a packed word holds several; scales count none), for the index's ``total_parameters``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parameters: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB = 5 (as `5 << 30`); transformers' default is the same


def plan_shards(slots: list[TensorSlot], max_bytes: int | None = None) -> list[list[TensorSlot]]:
    """Cut the slots, in order, into shards as mlx-lm's ``make_shards`` does: a shard is closed when the next
    tensor would take it past ``max_bytes``; a tensor larger than the limit gets a shard of its own."""
    limit = MAX_SHARD_BYTES if max_bytes is None else max_bytes
    shards: list[list[TensorSlot]] = []
    size = 0
    for slot in slots:
        if not shards or size + slot.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Writes the declared slots, in order, into ``folder``'s ``model*.safetensors`` shards, one tensor at a
    time; only the shard being written is open. Leaving the ``with`` block normally checks that every slot was
    written and writes ``model.safetensors.index.json`` (total_size, total_parameters, weight_map sorted by
    name; JSON indented by ``indent``)."""

    def __init__(self, folder: Path, slots: list[TensorSlot], metadata: dict[str, str], *,
                 max_shard_bytes: int | None = None, indent: int = 2):
        if len({s.name for s in slots}) != len(slots):
            raise ValueError("ShardedWriter: duplicate tensor names")
        self.folder, self.metadata, self.indent = folder, metadata, indent
        self._shards = plan_shards(slots, max_shard_bytes)
        self._files = shard_file_names(len(self._shards))
        self._slots = slots
        self._shard = -1
        self._left = 0  # tensors still to write in the open shard
        self._writer: StreamingWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            self._open_next()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._left -= 1
        if self._left == 0:
            self._writer.close()
            self._writer = None

    def _open_next(self) -> None:
        self._shard += 1
        if self._shard >= len(self._shards):
            raise ValueError(f"{self.folder}: more tensors written than declared")
        shard = self._shards[self._shard]
        self._writer = StreamingWriter(self.folder / self._files[self._shard],
                                       [(s.name, s.dtype, s.shape) for s in shard], self.metadata)
        self._left = len(shard)

    def close(self) -> None:
        if self._writer is not None or self._shard != len(self._shards) - 1:
            raise ValueError(f"{self.folder}: closed before every declared tensor was written")
        weight_map = {s.name: self._files[i] for i, shard in enumerate(self._shards) for s in shard}
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self._slots),
                         "total_parameters": sum(s.parameters for s in self._slots)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=self.indent))

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.__exit__(exc_type, exc, tb)  # closes the open shard without completing it
            self._writer = None
