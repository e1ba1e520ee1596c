"""Byte layouts of GGUF block types, as ggml-common.h declares them.

One table, ``BLOCKS``: each quantized type is a block of ``block_size`` weights stored as a fixed
sequence of fields. Byte sizes are sums of the fields, so nothing else in cpmkit hard-codes 144 or 210;
tests check every entry against gguf-py's ``GGML_QUANT_SIZES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QType

QK_K = 256  # weights per K-quant super-block
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K

_FIELD_BYTES = {"f16": 2, "f32": 4, "u8": 1, "i8": 1}
_FIELD_TORCH = {"f16": torch.float16, "f32": torch.float32, "u8": torch.uint8, "i8": torch.int8}


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # one of _FIELD_BYTES
    count: int  # elements of dtype

    @property
    def nbytes(self) -> int:
        return _FIELD_BYTES[self.dtype] * self.count


@dataclass(frozen=True)
class BlockLayout:
    qtype: QType
    block_size: int  # weights per block
    fields: tuple[Field, ...]  # in storage order

    @property
    def type_size(self) -> int:
        return sum(f.nbytes for f in self.fields)

    def offset(self, name: str) -> int:
        """Byte offset of field ``name`` inside one block."""
        start = 0
        for f in self.fields:
            if f.name == name:
                return start
            start += f.nbytes
        raise KeyError(f"{self.qtype.name} has no field {name!r}")

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of one row of ``n_elements`` weights; the caller checks divisibility."""
        return n_elements // self.block_size * self.type_size

    def split_fields(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut raw blocks, uint8 ``(n_blocks, type_size)``, into one tensor per field, each
        ``(n_blocks, count)`` in the field's own dtype (copies, so views of odd offsets stay aligned)."""
        assert blocks.dtype == torch.uint8 and blocks.shape[-1] == self.type_size, blocks.shape
        out, start = {}, 0
        for f in self.fields:
            raw = blocks[:, start : start + f.nbytes].contiguous()
            out[f.name] = raw.view(_FIELD_TORCH[f.dtype])
            start += f.nbytes
        return out

    def join_fields(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_fields`: field tensors ``(n_blocks, count)`` to uint8 blocks."""
        parts = []
        for f in self.fields:
            t = fields[f.name].to(_FIELD_TORCH[f.dtype]).contiguous()
            assert t.shape[-1] == f.count, (f.name, t.shape)
            parts.append(t.view(torch.uint8))
        return torch.cat(parts, dim=-1)


def _block(qtype: QType, block_size: int, *fields: tuple[str, str, int]) -> BlockLayout:
    return BlockLayout(qtype, block_size, tuple(Field(*f) for f in fields))


BLOCKS: dict[QType, BlockLayout] = {
    b.qtype: b
    for b in (
        _block(QType.F32, 1, ("v", "f32", 1)),
        _block(QType.F16, 1, ("v", "f16", 1)),
        _block(QType.BF16, 1, ("v", "u8", 2)),  # raw bf16 bits, little-endian
        _block(QType.Q8_0, 32, ("d", "f16", 1), ("qs", "i8", 32)),
        _block(QType.Q4_0, 32, ("d", "f16", 1), ("qs", "u8", 16)),
        _block(QType.Q4_1, 32, ("d", "f16", 1), ("m", "f16", 1), ("qs", "u8", 16)),
        _block(QType.Q5_0, 32, ("d", "f16", 1), ("qh", "u8", 4), ("qs", "u8", 16)),
        _block(QType.Q5_1, 32, ("d", "f16", 1), ("m", "f16", 1), ("qh", "u8", 4), ("qs", "u8", 16)),
        _block(QType.Q2_K, QK_K, ("scales", "u8", QK_K // 16), ("qs", "u8", QK_K // 4),
               ("d", "f16", 1), ("dmin", "f16", 1)),
        _block(QType.Q3_K, QK_K, ("hmask", "u8", QK_K // 8), ("qs", "u8", QK_K // 4),
               ("scales", "u8", K_SCALE_SIZE), ("d", "f16", 1)),
        _block(QType.Q4_K, QK_K, ("d", "f16", 1), ("dmin", "f16", 1),
               ("scales", "u8", K_SCALE_SIZE), ("qs", "u8", QK_K // 2)),
        _block(QType.Q5_K, QK_K, ("d", "f16", 1), ("dmin", "f16", 1),
               ("scales", "u8", K_SCALE_SIZE), ("qh", "u8", QK_K // 8), ("qs", "u8", QK_K // 2)),
        _block(QType.Q6_K, QK_K, ("ql", "u8", QK_K // 2), ("qh", "u8", QK_K // 4),
               ("scales", "i8", QK_K // 16), ("d", "f16", 1)),
        _block(QType.TQ1_0, QK_K, ("qs", "u8", (QK_K - 4 * QK_K // 64) // 5), ("qh", "u8", QK_K // 64),
               ("d", "f16", 1)),
        _block(QType.TQ2_0, QK_K, ("qs", "u8", QK_K // 4), ("d", "f16", 1)),
    )
}


def layout(qtype: QType) -> BlockLayout:
    try:
        return BLOCKS[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in BLOCKS)
        raise ValueError(f"GGUF type {qtype.name} is not supported by cpmkit; supported: {supported}") from None
