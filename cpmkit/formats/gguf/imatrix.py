"""llama.cpp importance-matrix files: the GGUF format llama-imatrix writes and the legacy ``.dat`` format.

GGUF (tools/imatrix/imatrix.cpp ``save_imatrix``, read by common/imatrix-loader.cpp): no architecture;
keys ``general.type = "imatrix"``, ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (u32); per weight, in name order, two F32 tensors: ``<weight>.in_sum2`` with ggml
shape [ne0, n_mat] (the sum over tokens of each input column's squared activation, per expert for MoE
tensors) and ``<weight>.counts`` with shape [1, n_mat] (tokens seen, per expert).

Legacy ``.dat`` (``save_imatrix_legacy``): i32 entry count; per entry i32 name length, name, i32 ncall,
i32 value count, float32 values = (sum / count) * ncall; then optionally i32 chunk count, i32 length and
the dataset file name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import Keys

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.file import GGUFFileWriter, Metadata, TensorSlot, read_gguf

IMATRIX_TYPE = "imatrix"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ImatrixEntry:
    """One weight's statistics. GGUF: ``sums`` [n_mat, ne0] raw sums, ``counts`` [n_mat] tokens per
    matrix. Legacy: ``sums`` hold (sum / count) * ncall and ``counts`` is [ncall]."""

    sums: torch.Tensor  # float32
    counts: torch.Tensor  # int64

    def __post_init__(self) -> None:
        assert self.sums.dtype == torch.float32 and self.sums.dim() == 2, (self.sums.dtype, self.sums.shape)
        assert self.counts.dtype == torch.int64 and self.counts.dim() == 1, (self.counts.dtype, self.counts.shape)


@dataclass(frozen=True)
class ImatrixData:
    entries: dict[str, ImatrixEntry]  # GGUF weight name ("blk.0.attn_q.weight") -> statistics
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str | None = None  # the file it was read from


def write_imatrix(path: Path, data: ImatrixData) -> None:
    """Write ``data`` in llama-imatrix's GGUF format (byte-identical to its ``save_imatrix``)."""
    assert not data.legacy, "legacy statistics are not raw sums; they cannot be written as GGUF"
    meta = Metadata(None)
    meta.add(Keys.General.TYPE, IMATRIX_TYPE)
    meta.add("imatrix.datasets", data.datasets)
    meta.add("imatrix.chunk_count", data.chunk_count)
    meta.add("imatrix.chunk_size", data.chunk_size)
    names = sorted(data.entries)  # save_imatrix sorts for a deterministic order
    slots = []
    for name in names:
        n_mat, ne0 = data.entries[name].sums.shape
        slots += [TensorSlot(name + SUMS_SUFFIX, QType.F32, (n_mat, ne0)),
                  TensorSlot(name + COUNTS_SUFFIX, QType.F32, (n_mat, 1))]
    with GGUFFileWriter(path, meta, slots) as writer:
        for name in names:
            e = data.entries[name]
            writer.write(name + SUMS_SUFFIX, [e.sums])
            writer.write(name + COUNTS_SUFFIX, [e.counts.to(torch.float32)[:, None]])


def read_imatrix(path: str | Path) -> ImatrixData:
    """Read a GGUF or legacy .dat imatrix (``common_imatrix_load``: GGUF first, else legacy)."""
    path = Path(path)
    if not path.is_file():
        raise CpmkitError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf_imatrix(path) if magic == GGUF_MAGIC else _read_legacy(path)


def _read_gguf_imatrix(path: Path) -> ImatrixData:
    contents = read_gguf(path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in contents.tensors.items():
        for suffix in (SUMS_SUFFIX, COUNTS_SUFFIX):
            if name.endswith(suffix):
                if t.qtype is not QType.F32:
                    raise CpmkitError(f"{path}: tensor {name} is {t.qtype.name}; imatrix sums and counts must be F32")
                pairs.setdefault(name.removesuffix(suffix), {})[suffix] = np.asarray(t.raw).view(np.float32)
    if not pairs:
        raise CpmkitError(f"{path}: a GGUF file without imatrix tensors (<weight>.in_sum2 / .counts)")
    entries = {}
    for name, found in sorted(pairs.items()):
        if len(found) != 2:
            raise CpmkitError(f"{path}: {name} has {'sums' if SUMS_SUFFIX in found else 'counts'} but not both")
        counts = torch.from_numpy(np.floor(found[COUNTS_SUFFIX] + 0.5).reshape(-1).astype(np.int64))  # lround, >= 0
        sums = torch.from_numpy(found[SUMS_SUFFIX].copy()).reshape(counts.numel(), -1)
        entries[name] = ImatrixEntry(sums, counts)
    meta = contents.metadata
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in meta]
    if missing:  # llama-quantize refuses such files ("missing imatrix metadata")
        raise CpmkitError(f"{path}: imatrix metadata key {missing[0]} is missing")
    return ImatrixData(entries, tuple(meta["imatrix.datasets"]), int(meta["imatrix.chunk_count"]),
                       int(meta["imatrix.chunk_size"]), legacy=False, path=str(path))


def _read_legacy(path: Path) -> ImatrixData:
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise CpmkitError(f"{path}: truncated legacy imatrix (neither GGUF nor a complete .dat file)")
        values = struct.unpack_from(fmt, buf, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise CpmkitError(f"{path}: not an imatrix file (no GGUF magic, and {n_entries} legacy entries)")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise CpmkitError(f"{path}: not an imatrix file (bad legacy entry name length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise CpmkitError(f"{path}: legacy entry {name} has {nval} values")
        values = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).copy()
        take(f"<{4 * nval}x")
        entries[name] = ImatrixEntry(torch.from_numpy(values).reshape(1, -1), torch.tensor([ncall], dtype=torch.int64))
    chunk_count, datasets = 0, ()
    if pos < len(buf):  # the trailing chunk count and dataset name are optional
        (chunk_count,) = take("<i")
        if pos + 4 <= len(buf):
            (length,) = take("<i")
            if length > 0:
                datasets = (take(f"<{length}s")[0].decode("utf-8", errors="replace"),)
    return ImatrixData(entries, datasets, chunk_count, 0, legacy=True, path=str(path))
