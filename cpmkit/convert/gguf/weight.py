"""A GGUF tensor as a ``cpmkit.kernels.QuantLinear`` weight: its bytes as stored, dequantized by the format's
own reader (``cpmkit.formats.gguf.blocks``) on the torch path and repacked into the kernels' affine layout
for Triton.

Every GGUF type decodes as ``w = d * sub_d * (q - zero) + m * sub_m`` (``cpmkit.kernels.layout``); the table
below says how one type's unpacked blocks (``blocks.unpack``: codes, d, dmin, scales, mins, exactly as
ggml's ``dequantize_row_*`` reads them) map onto those terms. Bit orders are read once, by the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.blocks import dequantize, unpack
from cpmkit.formats.gguf.layout import BLOCKS
from cpmkit.kernels import QuantLinear
from cpmkit.kernels.layout import (
    TRIT_BLOCK,
    AffineCodes,
    AffineLayout,
    PackedWeight,
    pack_affine,
    rows_per_chunk,
)
from cpmkit.quant.blocks import QuantizedBlocks


@dataclass(frozen=True)
class _KernelType:
    """How one GGUF type's unpacked blocks map onto the kernel layout."""

    layout: AffineLayout
    min_is_dmin: bool = False  # m = -dmin * mins (K-quants); otherwise m is the block's m field
    signed_codes: bool = False  # int8 codes, stored with the sign bit flipped (q + 128): layout.zero = 128
    scale_offset: int = 0  # subtracted from the stored sub-block scales to get int8 sub_d


def _lay(lo: int, hi: int, zero: int, block: int, sub: int | None = None, has_m: bool = False) -> AffineLayout:
    return AffineLayout(lo_bits=lo, hi_bits=hi, zero=zero, block=block, sub_block=sub or block, has_m=has_m)


# TQ1_0 keeps its base-3 bytes (a trits layout, 1.69 bits per weight; cpmkit.kernels.trits).
KERNEL_TYPES: dict[QType, _KernelType] = {
    QType.Q8_0: _KernelType(_lay(8, 0, 128, 32), signed_codes=True),
    QType.Q4_0: _KernelType(_lay(4, 0, 8, 32)),
    QType.Q4_1: _KernelType(_lay(4, 0, 0, 32, has_m=True)),
    QType.Q5_0: _KernelType(_lay(4, 1, 16, 32)),
    QType.Q5_1: _KernelType(_lay(4, 1, 0, 32, has_m=True)),
    QType.Q2_K: _KernelType(_lay(2, 0, 0, 256, 16, has_m=True), min_is_dmin=True),
    QType.Q3_K: _KernelType(_lay(2, 1, 4, 256, 16), scale_offset=32),
    QType.Q4_K: _KernelType(_lay(4, 0, 0, 256, 32, has_m=True), min_is_dmin=True),
    QType.Q5_K: _KernelType(_lay(4, 1, 0, 256, 32, has_m=True), min_is_dmin=True),
    QType.Q6_K: _KernelType(_lay(4, 2, 32, 256, 16)),
    QType.TQ1_0: _KernelType(AffineLayout(2, 0, 1, TRIT_BLOCK, TRIT_BLOCK, False, trits=True)),
    QType.TQ2_0: _KernelType(_lay(2, 0, 1, 256)),
}


def kernel_type(qtype: QType) -> _KernelType:
    try:
        return KERNEL_TYPES[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in KERNEL_TYPES)
        raise CpmkitError(f"GGUF type {qtype.name} has no cpmkit dequant-GEMM kernel; supported: {supported}") from None


def _affine_codes(q: QuantizedBlocks, kt: _KernelType, rows: int) -> AffineCodes:
    lay = kt.layout
    codes = q.codes.view(torch.uint8) ^ 0x80 if kt.signed_codes else q.codes
    m = sub_d = sub_m = None
    if lay.has_sub:
        sub_d = q.scales.to(torch.int8) - kt.scale_offset if kt.scale_offset else q.scales
    if lay.has_m:
        m = -q.dmin if kt.min_is_dmin else q.m
        sub_m = q.mins if lay.has_sub else None

    def per_row(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(rows, -1)  # (n_blocks, ...) -> (rows, K / group)

    return AffineCodes(layout=lay, codes=per_row(codes), d=per_row(q.d), m=per_row(m),
                       sub_d=per_row(sub_d), sub_m=per_row(sub_m))


def pack_gguf(raw: torch.Tensor, qtype: QType, shape: tuple[int, int], name: str = "weight") -> PackedWeight:
    """GGUF tensor bytes ``uint8 [N, K / block_size * type_size]`` of a weight of ``shape == (N, K)``
    -> :class:`PackedWeight` on ``raw``'s device."""
    kt = kernel_type(qtype)
    n, k = shape
    bl = BLOCKS[qtype]
    if k % bl.block_size or tuple(raw.shape) != (n, bl.row_bytes(k)) or raw.dtype != torch.uint8:
        raise CpmkitError(f"{name}: {qtype.name} data {raw.dtype} {tuple(raw.shape)} does not hold a {n}x{k} "
                          f"weight (expected uint8 ({n}, {bl.row_bytes(k) if k % bl.block_size == 0 else '?'}))")

    if kt.layout.trits:
        return _pack_trits(raw, kt.layout, n, k)

    def chunks() -> Iterator[tuple[int, AffineCodes]]:
        step = rows_per_chunk(k)
        for n0 in range(0, n, step):
            part = raw[n0 : n0 + step]
            blocks = part.reshape(-1, bl.type_size)  # (rows * K/block_size, type_size)
            yield n0, _affine_codes(unpack(blocks, qtype), kt, part.shape[0])

    return pack_affine(chunks(), kt.layout, n, k)


def _pack_trits(raw: torch.Tensor, lay: AffineLayout, n: int, k: int) -> PackedWeight:
    """TQ1_0 rows as stored, only made K-major: per block, ``qs`` as 12 int32 words, ``qh`` as one, ``d``."""
    fields = BLOCKS[QType.TQ1_0].split_fields(raw.reshape(n * k // TRIT_BLOCK, -1))

    def k_major(t: torch.Tensor) -> torch.Tensor:  # (n * blocks, bytes) -> (blocks * bytes / 4, n) in its dtype
        return t.contiguous().view(torch.int32 if t.dtype == torch.uint8 else t.dtype).reshape(n, -1).T.contiguous()

    return PackedWeight(layout=lay, n=n, k=k, lo=k_major(fields["qs"]), hi=k_major(fields["qh"]),
                        d=k_major(fields["d"]), m=None, sub_d=None, sub_m=None)


@dataclass(frozen=True)
class GGUFWeight:
    """A GGUF tensor: buffer ``raw`` uint8 ``[N, K / block_size * type_size]``, blocks along K."""

    qtype: QType
    shape: tuple[int, int]  # (N, K)
    buffer_names = ("raw",)

    @property
    def label(self) -> str:
        """The weight type in speed tables."""
        return self.qtype.name

    def check(self, raw: torch.Tensor, name: str) -> None:
        kernel_type(self.qtype)  # raises for types without a kernel
        n, k = self.shape
        bl = BLOCKS[self.qtype]
        if k % bl.block_size or raw.dtype != torch.uint8 or tuple(raw.shape) != (n, bl.row_bytes(k)):
            raise CpmkitError(f"{name}: {self.qtype.name} data {raw.dtype} {tuple(raw.shape)} does not hold an "
                              f"{n}x{k} weight; expected uint8 rows of K/{bl.block_size} blocks of "
                              f"{bl.type_size} bytes")

    def dequantize(self, raw: torch.Tensor) -> torch.Tensor:
        return dequantize(raw, self.qtype)

    def dequantize_rows(self, raw: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return dequantize(raw[start:stop], self.qtype)

    def pack(self, raw: torch.Tensor, name: str) -> PackedWeight:
        return pack_gguf(raw, self.qtype, self.shape, name)

    def describe(self) -> str:
        return f"gguf {self.qtype.name}"


def gguf_linear(raw: torch.Tensor, qtype: QType, shape: tuple[int, int], bias: torch.Tensor | None = None,
                **options) -> QuantLinear:
    """A QuantLinear over a GGUF tensor's bytes ``raw`` uint8 ``[N, row_bytes]`` of a weight ``(N, K)``;
    ``options``: QuantLinear's (backend, cache_dequantized, name)."""
    return QuantLinear(GGUFWeight(QType(qtype), (int(shape[0]), int(shape[1]))), {"raw": raw}, bias, **options)
