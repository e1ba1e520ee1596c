"""GGUF files: typed metadata, a streaming writer and a reader (layout only; gguf-py does the bytes).

Metadata keys are one typed table, ``KEYS`` (names from gguf-py's ``Keys`` constants, ``{arch}`` filled
in), instead of one method per key. :class:`Metadata` keeps insertion order, which is the order the file
lists them in: ``add`` appends like gguf-py's writer, ``put_last`` removes and appends like ggml's
``gguf_set_val_*`` (what llama-quantize does to ``general.file_type``).

:class:`GGUFFileWriter` declares every tensor up front (``GGUFWriter.add_tensor_info``), writes header,
key/values and the tensor-info table at once, then takes each tensor's bytes in declared order (in chunks), so
a model is never held in memory. :func:`read_gguf` memory-maps a file (``gguf.GGUFReader``) and returns
its metadata and each tensor's raw bytes, type and shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys
from gguf.gguf_writer import GGUFValue

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.layout import layout

V = GGUFValueType
GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


@dataclass(frozen=True)
class KeyType:
    type: GGUFValueType
    item: GGUFValueType | None = None  # element type of an ARRAY


def _array(item: GGUFValueType) -> KeyType:
    return KeyType(V.ARRAY, item)


# Every key cpmkit writes, with the type llama.cpp reads it as (gguf_writer.py's add_* helpers).
KEYS: dict[str, KeyType] = {
    Keys.General.ARCHITECTURE: KeyType(V.STRING),
    Keys.General.TYPE: KeyType(V.STRING),
    Keys.General.NAME: KeyType(V.STRING),
    Keys.General.FILE_TYPE: KeyType(V.UINT32),
    Keys.General.QUANTIZATION_VERSION: KeyType(V.UINT32),
    Keys.LLM.VOCAB_SIZE: KeyType(V.UINT32),
    Keys.LLM.CONTEXT_LENGTH: KeyType(V.UINT32),
    Keys.LLM.EMBEDDING_LENGTH: KeyType(V.UINT32),
    Keys.LLM.BLOCK_COUNT: KeyType(V.UINT32),
    Keys.LLM.FEED_FORWARD_LENGTH: KeyType(V.UINT32),
    Keys.LLM.EXPERT_COUNT: KeyType(V.UINT32),
    Keys.LLM.EXPERT_USED_COUNT: KeyType(V.UINT32),
    Keys.LLM.EMBEDDING_SCALE: KeyType(V.FLOAT32),
    Keys.LLM.RESIDUAL_SCALE: KeyType(V.FLOAT32),
    Keys.LLM.LOGIT_SCALE: KeyType(V.FLOAT32),
    Keys.Attention.HEAD_COUNT: KeyType(V.UINT32),
    Keys.Attention.HEAD_COUNT_KV: KeyType(V.UINT32),
    Keys.Attention.LAYERNORM_RMS_EPS: KeyType(V.FLOAT32),
    Keys.Attention.KEY_LENGTH: KeyType(V.UINT32),
    Keys.Attention.VALUE_LENGTH: KeyType(V.UINT32),
    Keys.Attention.Q_LORA_RANK: KeyType(V.UINT32),
    Keys.Attention.KV_LORA_RANK: KeyType(V.UINT32),
    Keys.Rope.DIMENSION_COUNT: KeyType(V.UINT32),
    Keys.Rope.FREQ_BASE: KeyType(V.FLOAT32),
    Keys.Rope.SCALING_TYPE: KeyType(V.STRING),
    Keys.Rope.SCALING_FACTOR: KeyType(V.FLOAT32),
    Keys.Rope.SCALING_ATTN_FACTOR: KeyType(V.FLOAT32),
    Keys.Rope.SCALING_ORIG_CTX_LEN: KeyType(V.UINT32),
    Keys.Tokenizer.MODEL: KeyType(V.STRING),
    Keys.Tokenizer.PRE: KeyType(V.STRING),
    Keys.Tokenizer.LIST: _array(V.STRING),
    Keys.Tokenizer.SCORES: _array(V.FLOAT32),
    Keys.Tokenizer.TOKEN_TYPE: _array(V.INT32),
    Keys.Tokenizer.MERGES: _array(V.STRING),
    Keys.Tokenizer.BOS_ID: KeyType(V.UINT32),
    Keys.Tokenizer.EOS_ID: KeyType(V.UINT32),
    Keys.Tokenizer.UNK_ID: KeyType(V.UINT32),
    Keys.Tokenizer.SEP_ID: KeyType(V.UINT32),
    Keys.Tokenizer.PAD_ID: KeyType(V.UINT32),
    Keys.Tokenizer.MASK_ID: KeyType(V.UINT32),
    Keys.Tokenizer.ADD_BOS: KeyType(V.BOOL),
    Keys.Tokenizer.ADD_EOS: KeyType(V.BOOL),
    Keys.Tokenizer.ADD_SEP: KeyType(V.BOOL),
    Keys.Tokenizer.ADD_PREFIX: KeyType(V.BOOL),
    Keys.Tokenizer.CHAT_TEMPLATE: KeyType(V.STRING),
    # tools/quantize/quantize.cpp, passed as kv overrides (INT overrides are stored as u32, llama-quant.cpp)
    "quantize.imatrix.file": KeyType(V.STRING),
    "quantize.imatrix.dataset": KeyType(V.STRING),
    "quantize.imatrix.entries_count": KeyType(V.UINT32),
    "quantize.imatrix.chunks_count": KeyType(V.UINT32),
    # common/imatrix-loader.h
    "imatrix.datasets": _array(V.STRING),
    "imatrix.chunk_count": KeyType(V.UINT32),
    "imatrix.chunk_size": KeyType(V.UINT32),
}


class Metadata:
    """Ordered, typed GGUF key/values of one file whose architecture is ``arch`` (None: no architecture
    key, as in an imatrix file)."""

    def __init__(self, arch: str | None):
        self.arch = arch
        self._values: dict[str, GGUFValue] = {}
        if arch is not None:
            self.add(Keys.General.ARCHITECTURE, arch)

    def _typed(self, key: str, value: Any) -> tuple[str, GGUFValue]:
        kt = KEYS[key]  # a key missing from the table is a programming error
        return key.format(arch=self.arch), GGUFValue(_coerce(value, kt), kt.type, kt.item)

    def add(self, key: str, value: Any) -> None:
        """Append ``key`` (a ``KEYS`` template); a key already present is a bug."""
        name, typed = self._typed(key, value)
        assert name not in self._values, name
        self._values[name] = typed

    def put_last(self, key: str, value: Any) -> None:
        """Remove ``key`` if present and append it (ggml's gguf_set_val_* semantics)."""
        name, typed = self._typed(key, value)
        self._values.pop(name, None)
        self._values[name] = typed

    def add_typed(self, values: dict[str, GGUFValue]) -> None:
        """Append values that already carry their GGUF type (general.* model-card keys from gguf-py)."""
        for name, value in values.items():
            assert name not in self._values, name
            self._values[name] = value

    def items(self) -> list[tuple[str, GGUFValue]]:
        return list(self._values.items())

    def values(self) -> dict[str, Any]:
        return {name: v.value for name, v in self._values.items()}


def _coerce(value: Any, kt: KeyType) -> Any:
    if kt.type is V.ARRAY:
        if len(value) == 0:
            raise CpmkitError("GGUF cannot store an empty array")
        return list(value)
    if kt.type is V.STRING:
        return str(value)
    if kt.type is V.BOOL:
        return bool(value)
    if kt.type is V.FLOAT32:
        return float(value)
    return int(value)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor as the file declares it: ``shape`` in torch order (last dimension = ggml ne[0], the row)."""

    name: str
    qtype: QType
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        lay = layout(self.qtype)
        assert self.shape[-1] % lay.block_size == 0, (self.name, self.shape, self.qtype.name)
        return lay.row_bytes(self.shape[-1])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape[:-1]) * self.row_bytes

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.row_bytes)


class GGUFFileWriter:
    """Stream a GGUF file: metadata and tensor infos first (gguf-py's writer, up to its TI_DATA state), then
    ``write(name, chunks)`` for every declared tensor, in declared order, straight to the file so that one
    tensor may arrive in pieces. Use as a context manager; a missing tensor raises on exit."""

    def __init__(self, path: Path, metadata: Metadata, slots: list[TensorSlot]):
        self._slots = list(slots)
        self._next = 0
        self._gw = GGUFWriter(path, metadata.arch or "")
        self._gw.kv_data[0].clear()  # the constructor's general.architecture is in ``metadata`` already
        for name, value in metadata.items():
            self._gw.kv_data[0][name] = value
        for slot in self._slots:
            self._gw.add_tensor_info(slot.name, slot.byte_shape, np.dtype(np.uint8), slot.nbytes, raw_dtype=slot.qtype)
        self._gw.write_header_to_file(path)
        self._gw.write_kv_data_to_file()
        self._gw.write_ti_data_to_file()

    def write(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write tensor ``name``'s bytes, given as consecutive chunks (each uint8 ``[..., row_bytes]`` or a
        tensor of the slot's float dtype), so a large tensor never needs one buffer. Data starts aligned and
        is zero-padded to the alignment, as ``GGUFWriter.write_tensor_data`` does."""
        slot = self._slots[self._next]
        assert name == slot.name, f"tensor {name} written where {slot.name} was declared"
        fout = self._gw.fout[0]
        self._gw.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks:
            data = chunk.detach().contiguous().cpu().view(torch.uint8).numpy()
            data.tofile(fout)
            written += data.nbytes
        assert written == slot.nbytes, (name, written, slot.nbytes)
        self._gw.write_padding(fout, written)
        self._next += 1

    def close(self) -> None:
        self._gw.close()

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None and self._next != len(self._slots):
            raise AssertionError(f"{len(self._slots) - self._next} declared tensors were never written")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a GGUF file: raw bytes as stored (uint8 ``[..., row_bytes]``, memory-mapped: read small
    tensors from the map, large ones with :meth:`torch_raw`)."""

    name: str
    qtype: QType
    shape: tuple[int, ...]  # torch order: last dimension = row length
    raw: np.ndarray
    offset: int  # absolute file offset of the data
    path: Path

    def torch_raw(self, index: int | None = None) -> torch.Tensor:
        """The bytes (of matrix ``index`` of a 3-D tensor) as a torch tensor of their own, read from the file:
        pages read through the map would stay mapped, and counted as this process's memory, for as long as the
        file is open."""
        shape = self.raw.shape if index is None else self.raw.shape[1:]
        count = int(np.prod(shape))
        data = np.fromfile(self.path, dtype=np.uint8, count=count, offset=self.offset + (index or 0) * count)
        if data.size != count:
            raise CpmkitError(f"{self.path}: tensor {self.name} could not be read whole; the file changed")
        return torch.from_numpy(data.reshape(shape))


@dataclass(frozen=True)
class GGUFContents:
    path: Path
    metadata: dict[str, Any]
    value_types: dict[str, tuple[GGUFValueType, ...]]  # key -> (type, element type for arrays)
    tensors: dict[str, StoredTensor]  # in file order

    @property
    def architecture(self) -> str:
        return self.metadata.get(Keys.General.ARCHITECTURE, "")

    def arch_value(self, key: str, default: Any = None) -> Any:
        """The value of a ``KEYS`` template with ``{arch}`` filled in."""
        return self.metadata.get(key.format(arch=self.architecture), default)


def read_gguf(path: str | Path) -> GGUFContents:
    """Read a GGUF file's metadata and tensor table; tensor bytes stay memory-mapped. A truncated or corrupt
    file (counts or offsets past its end, unknown types, shapes that do not fit the bytes) is one CpmkitError."""
    path = Path(path)
    if not path.is_file():
        raise CpmkitError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        metadata, value_types = {}, {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            metadata[name] = field.contents()
            value_types[name] = tuple(field.types)
        tensors = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            qtype = QType(t.tensor_type)
            raw = np.asarray(t.data).view(np.uint8)
            if int(t.data_offset) + raw.nbytes > size:
                raise ValueError(f"tensor {t.name} ends at byte {int(t.data_offset) + raw.nbytes}, past the end")
            tensors[t.name] = StoredTensor(t.name, qtype, shape, raw.reshape(*shape[:-1], -1), int(t.data_offset),
                                           path)
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        # gguf-py's reader raises these on bad files (numpy's on counts and offsets past the end)
        raise CpmkitError(f"{path}: not a readable GGUF file, truncated or corrupt ({size} bytes): {e}") from None
    return GGUFContents(path, metadata, value_types, tensors)
