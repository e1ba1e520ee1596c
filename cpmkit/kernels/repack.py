"""Load-time repacking of artifact tensors (GGUF blocks, MLX affine) into the kernel layout.

GGUF goes through ``cpmkit.formats.gguf.quantized.QuantizedBlocks``, the GGUF owners' hand-over struct
between quantizer and packer: the raw blocks are cut into fields with the layout table
(``BLOCKS[qtype].split_fields``), their bits unpacked into codes and sub-block scales (the inverse of
``blocks.pack``, checked byte for byte against it in the tests), and a per-type table entry says how
those fields map onto :class:`~cpmkit.kernels.layout.AffineLayout`. Bit orders follow ggml-common.h and
the ``dequantize_row_*`` routines in ggml-quants.c. MLX codes come from ``cpmkit.formats.mlx_pack``.
Nothing here produces floats: dequantizing is the formats' job (and the kernels').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.layout import BLOCKS
from cpmkit.formats.gguf.quantized import QuantizedBlocks
from cpmkit.formats.mlx_pack import unpack_codes
from cpmkit.kernels.layout import (
    AffineCodes,
    AffineLayout,
    PackedWeight,
    pack_affine,
    rows_per_chunk,
)

# ---- GGUF: raw blocks -> QuantizedBlocks ------------------------------------------------------------


def _fields_of(raw: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """uint8 ``(n, m)`` -> ``(n, count, m)``: field ``i`` is bits ``[i*bits, (i+1)*bits)`` of each byte."""
    shifts = (torch.arange(count, dtype=torch.uint8, device=raw.device) * bits)[None, :, None]
    return (raw[:, None, :] >> shifts) & ((1 << bits) - 1)


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Byte j of a 16-byte run: element j in the low nibble, j + 16 in the high (block_q4_0 and kin)."""
    return _fields_of(qs, 2, 4).reshape(qs.shape[0], -1)


def _bits_lsb_first(raw: torch.Tensor) -> torch.Tensor:
    """Bit j of the little-endian byte string is element j (Q5_0/Q5_1 ``qh``)."""
    return _fields_of(raw, 8, 1).transpose(1, 2).reshape(raw.shape[0], -1)


def _crumbs_by_128(qs: torch.Tensor) -> torch.Tensor:
    """2-bit fields: byte 32h + l holds element 128h + 32s + l in bits 2s (Q2_K, Q3_K, TQ2_0 ``qs``)."""
    halves = qs.reshape(-1, 32)  # one row per 128 elements
    return _fields_of(halves, 4, 2).reshape(qs.shape[0], -1)


def _nibbles_by_64(qs: torch.Tensor) -> torch.Tensor:
    """Byte 32c + l: element 64c + l in the low nibble, 64c + 32 + l in the high (Q4_K/Q5_K ``qs``)."""
    return _fields_of(qs.reshape(-1, 32), 2, 4).reshape(qs.shape[0], -1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> eight 6-bit scales and mins, as ggml's get_scale_min_k4."""
    lo, mid, hi = s[:, :4], s[:, 4:8], s[:, 8:]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, mn


def _d(f: dict[str, torch.Tensor], name: str = "d") -> torch.Tensor:
    return f[name][:, 0]


def _q8_0(f):
    return QuantizedBlocks(QType.Q8_0, codes=f["qs"], d=_d(f))


def _q4_0(f):
    return QuantizedBlocks(QType.Q4_0, codes=_low_high_nibbles(f["qs"]), d=_d(f))


def _q4_1(f):
    return QuantizedBlocks(QType.Q4_1, codes=_low_high_nibbles(f["qs"]), d=_d(f), m=_d(f, "m"))


def _q5_0(f):
    codes = _low_high_nibbles(f["qs"]) | (_bits_lsb_first(f["qh"]) << 4)
    return QuantizedBlocks(QType.Q5_0, codes=codes, d=_d(f))


def _q5_1(f):
    codes = _low_high_nibbles(f["qs"]) | (_bits_lsb_first(f["qh"]) << 4)
    return QuantizedBlocks(QType.Q5_1, codes=codes, d=_d(f), m=_d(f, "m"))


def _q2_k(f):
    s = f["scales"]  # low nibble: scale of sub-block j, high nibble: its min
    return QuantizedBlocks(QType.Q2_K, codes=_crumbs_by_128(f["qs"]), d=_d(f), dmin=_d(f, "dmin"),
                           scales=s & 0xF, mins=s >> 4)


def _q3_k(f):
    s = f["scales"]  # 16 six-bit scales: low nibbles in bytes 0..7, top 2 bits in bytes 8..11
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    high = _fields_of(s[:, 8:], 4, 2).reshape(s.shape[0], 16)  # scale j's top bits: byte 8 + j%4, bits 2*(j//4)
    hbit = _fields_of(f["hmask"], 8, 1).reshape(s.shape[0], 256)  # bit b of hmask[l]: element 32b + l
    codes = _crumbs_by_128(f["qs"]) | (hbit << 2)
    return QuantizedBlocks(QType.Q3_K, codes=codes, d=_d(f), scales=low | (high << 4))


def _q4_k(f):
    sc, mn = _scale_min_k4(f["scales"])
    return QuantizedBlocks(QType.Q4_K, codes=_nibbles_by_64(f["qs"]), d=_d(f), dmin=_d(f, "dmin"),
                           scales=sc, mins=mn)


def _q5_k(f):
    sc, mn = _scale_min_k4(f["scales"])
    fifth = _fields_of(f["qh"], 8, 1).reshape(f["qh"].shape[0], 256)  # bit s of qh[l]: element 32s + l
    return QuantizedBlocks(QType.Q5_K, codes=_nibbles_by_64(f["qs"]) | (fifth << 4), d=_d(f),
                           dmin=_d(f, "dmin"), scales=sc, mins=mn)


def _q6_k(f):
    n = f["ql"].shape[0]
    ql = f["ql"].reshape(n, 2, 64)  # per 128-half: low nibble -> element l, high -> element 64 + l
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)
    high = _fields_of(f["qh"].reshape(n * 2, 32), 4, 2).reshape(n, 2, 128)  # bits 2s of qh[l]: 32s + l
    return QuantizedBlocks(QType.Q6_K, codes=(low | (high << 4)).reshape(n, 256), d=_d(f), scales=f["scales"])


def _tq2_0(f):
    return QuantizedBlocks(QType.TQ2_0, codes=_crumbs_by_128(f["qs"]), d=_d(f))


def _trits(b: torch.Tensor, count: int) -> torch.Tensor:
    """Bytes ``(n, m)`` -> ``(n, count * m)``: trit t of byte j is element ``t*m + j``, read as
    dequantize_row_tq1_0 does: ``((uint8)(byte * 3**t) * 3) >> 8``."""
    pow3 = torch.tensor([1, 3, 9, 27, 81][:count], dtype=torch.int32, device=b.device)[None, :, None]
    scaled = (b.to(torch.int32)[:, None, :] * pow3) & 0xFF
    return ((scaled * 3) >> 8).to(torch.uint8).reshape(b.shape[0], -1)


def _tq1_0(f):
    qs = f["qs"]  # bytes 0..31: elements j + 32t; bytes 32..47: 160 + j + 16t; qh: 240 + j + 4t
    codes = torch.cat([_trits(qs[:, :32], 5), _trits(qs[:, 32:], 5), _trits(f["qh"], 4)], dim=1)
    return QuantizedBlocks(QType.TQ1_0, codes=codes, d=_d(f))


@dataclass(frozen=True)
class _GGUFKernelType:
    """How one GGUF type's QuantizedBlocks map onto the kernel layout."""

    unpack: Callable[[dict[str, torch.Tensor]], QuantizedBlocks]
    layout: AffineLayout
    min_is_dmin: bool = False  # m = -dmin * mins (K-quants); otherwise m is the block's m field
    signed_codes: bool = False  # int8 codes, stored with the sign bit flipped (q + 128): layout.zero = 128
    scale_offset: int = 0  # subtracted from the stored sub-block scales to get int8 sub_d


def _lay(lo: int, hi: int, zero: int, block: int, sub: int | None = None, has_m: bool = False) -> AffineLayout:
    return AffineLayout(lo_bits=lo, hi_bits=hi, zero=zero, block=block, sub_block=sub or block, has_m=has_m)


# TQ1_0's base-3 trits become 2-bit codes: it runs as TQ2_0 (2.06 instead of 1.69 bits per weight).
GGUF_KERNEL_TYPES: dict[QType, _GGUFKernelType] = {
    QType.Q8_0: _GGUFKernelType(_q8_0, _lay(8, 0, 128, 32), signed_codes=True),
    QType.Q4_0: _GGUFKernelType(_q4_0, _lay(4, 0, 8, 32)),
    QType.Q4_1: _GGUFKernelType(_q4_1, _lay(4, 0, 0, 32, has_m=True)),
    QType.Q5_0: _GGUFKernelType(_q5_0, _lay(4, 1, 16, 32)),
    QType.Q5_1: _GGUFKernelType(_q5_1, _lay(4, 1, 0, 32, has_m=True)),
    QType.Q2_K: _GGUFKernelType(_q2_k, _lay(2, 0, 0, 256, 16, has_m=True), min_is_dmin=True),
    QType.Q3_K: _GGUFKernelType(_q3_k, _lay(2, 1, 4, 256, 16), scale_offset=32),
    QType.Q4_K: _GGUFKernelType(_q4_k, _lay(4, 0, 0, 256, 32, has_m=True), min_is_dmin=True),
    QType.Q5_K: _GGUFKernelType(_q5_k, _lay(4, 1, 0, 256, 32, has_m=True), min_is_dmin=True),
    QType.Q6_K: _GGUFKernelType(_q6_k, _lay(4, 2, 32, 256, 16)),
    QType.TQ1_0: _GGUFKernelType(_tq1_0, _lay(2, 0, 1, 256)),
    QType.TQ2_0: _GGUFKernelType(_tq2_0, _lay(2, 0, 1, 256)),
}


def gguf_kernel_type(qtype: QType) -> _GGUFKernelType:
    try:
        return GGUF_KERNEL_TYPES[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in GGUF_KERNEL_TYPES)
        raise CpmkitError(f"GGUF type {qtype.name} has no cpmkit dequant-GEMM kernel; supported: {supported}") from None


def unpack_gguf_blocks(blocks: torch.Tensor, qtype: QType) -> QuantizedBlocks:
    """uint8 ``(n_blocks, type_size)`` -> codes and parameters, the inverse of ``blocks.pack``."""
    return gguf_kernel_type(qtype).unpack(BLOCKS[qtype].split_fields(blocks))


def _affine_from_blocks(q: QuantizedBlocks, kt: _GGUFKernelType, rows: int) -> AffineCodes:
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
    kt = gguf_kernel_type(qtype)
    n, k = shape
    bl = BLOCKS[qtype]
    if k % bl.block_size or tuple(raw.shape) != (n, bl.row_bytes(k)) or raw.dtype != torch.uint8:
        raise CpmkitError(f"{name}: {qtype.name} data {raw.dtype} {tuple(raw.shape)} does not hold a {n}x{k} "
                          f"weight (expected uint8 ({n}, {bl.row_bytes(k) if k % bl.block_size == 0 else '?'}))")

    def chunks() -> Iterator[tuple[int, AffineCodes]]:
        step = rows_per_chunk(k)
        for n0 in range(0, n, step):
            part = raw[n0 : n0 + step]
            blocks = part.reshape(-1, bl.type_size)  # (rows * K/block_size, type_size)
            yield n0, _affine_from_blocks(unpack_gguf_blocks(blocks, qtype), kt, part.shape[0])

    return pack_affine(chunks(), kt.layout, n, k)


# ---- MLX affine ---------------------------------------------------------------------------------------

# Code width -> (low plane, high plane): odd widths split like GGUF's (4 + 1, 4 + 2, 2 + 1).
MLX_PLANES = {2: (2, 0), 3: (2, 1), 4: (4, 0), 5: (4, 1), 6: (4, 2), 8: (8, 0)}


def mlx_layout(bits: int, group_size: int) -> AffineLayout:
    if bits not in MLX_PLANES:
        raise CpmkitError(f"MLX affine: bits={bits} has no cpmkit kernel; supported: {sorted(MLX_PLANES)}")
    lo, hi = MLX_PLANES[bits]
    return _lay(lo, hi, 0, group_size, has_m=True)


def pack_mlx(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
             name: str = "weight") -> PackedWeight:
    """MLX ``weight`` uint32 ``[N, K*bits/32]`` with ``scales``/``biases`` ``[N, K/group_size]`` -> PackedWeight."""
    lay = mlx_layout(bits, group_size)
    n = weight.shape[0]
    k = weight.shape[-1] * 32 // bits
    if weight.dim() != 2 or k % group_size or scales.shape != (n, k // group_size) or biases.shape != scales.shape:
        raise CpmkitError(f"{name}: MLX weight {tuple(weight.shape)}, scales {tuple(scales.shape)} and biases "
                          f"{tuple(biases.shape)} do not fit {bits}-bit codes in groups of {group_size}")

    def chunks() -> Iterator[tuple[int, AffineCodes]]:
        step = rows_per_chunk(k)
        for n0 in range(0, n, step):
            rows = slice(n0, n0 + step)
            codes = unpack_codes(weight[rows], bits, k).to(weight.device)  # unpack_codes returns CPU tensors
            yield n0, AffineCodes(layout=lay, codes=codes, d=scales[rows], m=biases[rows], sub_d=None, sub_m=None)

    return pack_affine(chunks(), lay, n, k)
