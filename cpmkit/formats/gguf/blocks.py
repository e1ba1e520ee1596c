"""GGUF block packers and unpackers, one class per ggml type (gguf-py ``quants.py`` style, in torch).

Each class registers itself by ``qtype`` and implements three methods on 2-D tensors:
``pack_blocks(q: QuantizedBlocks) -> uint8 (n_blocks, type_size)`` lays out codes and parameters as
ggml-common.h declares them; ``unpack_blocks(raw) -> QuantizedBlocks`` is its exact inverse (every bit
layout is written here once: the kernels' load-time repack reads codes through it too); and
``values(q) -> float32 (n_blocks, block_size)`` is ggml's ``dequantize_row_*`` arithmetic (same float32
operations in the same order, so results are bit-identical). Choosing codes is ``cpmkit.quant``'s job.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.layout import BLOCKS, BlockLayout
from cpmkit.quant.blocks import QuantizedBlocks

DEQUANT_CHUNK_BYTES = 1 << 20  # raw bytes dequantized at once by dequantize(): bounds temporaries

_BLOCK_TYPES: dict[QType, type[BlockType]] = {}


class BlockType:
    qtype: ClassVar[QType]
    layout: ClassVar[BlockLayout]

    def __init_subclass__(cls, *, qtype: QType) -> None:
        assert qtype not in _BLOCK_TYPES, qtype
        cls.qtype = qtype
        cls.layout = BLOCKS[qtype]
        _BLOCK_TYPES[qtype] = cls

    @classmethod
    def pack_blocks(cls, q: QuantizedBlocks) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def unpack_blocks(cls, raw: torch.Tensor) -> QuantizedBlocks:
        raise NotImplementedError

    @classmethod
    def values(cls, q: QuantizedBlocks) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def pack(cls, q: QuantizedBlocks) -> torch.Tensor:
        assert q.qtype == cls.qtype and q.codes.shape[1] == cls.layout.block_size, (q.qtype, q.codes.shape)
        raw = cls.pack_blocks(q)
        assert raw.dtype == torch.uint8 and raw.shape == (q.n_blocks, cls.layout.type_size), raw.shape
        return raw

    @classmethod
    def unpack(cls, raw: torch.Tensor) -> QuantizedBlocks:
        assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.shape[1] == cls.layout.type_size, raw.shape
        q = cls.unpack_blocks(raw)
        assert q.qtype == cls.qtype and q.codes.shape == (raw.shape[0], cls.layout.block_size), q.codes.shape
        return q

    @classmethod
    def dequantize_blocks(cls, raw: torch.Tensor) -> torch.Tensor:
        out = cls.values(cls.unpack(raw))
        assert out.dtype == torch.float32 and out.shape == (raw.shape[0], cls.layout.block_size), out.shape
        return out


def block_type(qtype: QType) -> type[BlockType]:
    try:
        return _BLOCK_TYPES[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in _BLOCK_TYPES)
        raise CpmkitError(f"GGUF type {qtype.name} is not supported by cpmkit; supported: {supported}") from None


def pack(q: QuantizedBlocks) -> torch.Tensor:
    """Quantized codes and parameters -> uint8 ``(n_blocks, type_size)``."""
    return block_type(q.qtype).pack(q)


def unpack(raw: torch.Tensor, qtype: QType) -> QuantizedBlocks:
    """uint8 ``(n_blocks, type_size)`` -> the codes and parameters :func:`pack` was given."""
    return block_type(qtype).unpack(raw)


def dequantize(raw: torch.Tensor, qtype: QType) -> torch.Tensor:
    """uint8 ``[..., row_bytes]`` -> float32 ``[..., row_elements]``, exactly like ggml's dequantize_row_*."""
    cls = block_type(qtype)
    lay = cls.layout
    if raw.dtype != torch.uint8 or raw.dim() == 0 or raw.shape[-1] % lay.type_size:
        raise CpmkitError(f"{qtype.name} data must be uint8 with rows of whole {lay.type_size}-byte blocks; "
                          f"got {raw.dtype} {tuple(raw.shape)}")
    lead, row_bytes = raw.shape[:-1], raw.shape[-1]
    blocks = raw.reshape(-1, lay.type_size)  # (n_blocks, type_size)
    out = torch.empty(blocks.shape[0], lay.block_size, device=raw.device)
    step = max(1, DEQUANT_CHUNK_BYTES // lay.type_size)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = cls.dequantize_blocks(blocks[i : i + step])
    return out.reshape(*lead, row_bytes // lay.type_size * lay.block_size)


# ---- bit helpers (all on uint8 tensors) ---------------------------------------------------------


def _or_shifted(parts: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """OR of ``parts`` along ``dim``, part k shifted left by k*bits (packs 2-, 4- or 1-bit fields)."""
    parts = parts.to(torch.uint8)
    out = parts.select(dim, 0).clone()
    for k in range(1, parts.shape[dim]):
        out |= parts.select(dim, k) << (k * bits)
    return out


def _split_shifted(packed: torch.Tensor, dim: int, count: int, bits: int) -> torch.Tensor:
    """Inverse of _or_shifted: a new axis ``dim`` of ``count`` fields of ``bits`` bits."""
    shifts = torch.arange(count, dtype=torch.uint8, device=packed.device) * bits
    shape = [1] * (packed.dim() + 1)
    shape[dim] = count
    return (packed.unsqueeze(dim) >> shifts.reshape(shape)) & ((1 << bits) - 1)


def _d(f: dict[str, torch.Tensor], name: str = "d") -> torch.Tensor:
    """A block's one float16 field, (n, 1) -> (n,)."""
    return f[name][:, 0]


def _f16(t: torch.Tensor) -> torch.Tensor:
    """(n,) float16 -> (n, 1) float32 (ggml's GGML_FP16_TO_FP32), for broadcasting over a block."""
    return t.float()[:, None]


def _sub_blocks(values: torch.Tensor, n_sub: int) -> torch.Tensor:
    return values.reshape(values.shape[0], n_sub, -1)


# ---- float types ---------------------------------------------------------------------------------


class F32(BlockType, qtype=QType.F32):
    @classmethod
    def pack_blocks(cls, q):
        return q.codes.to(torch.float32).contiguous().view(torch.uint8)

    @classmethod
    def unpack_blocks(cls, raw):
        return QuantizedBlocks(cls.qtype, raw.contiguous().view(torch.float32))

    @classmethod
    def values(cls, q):
        return q.codes


class F16(BlockType, qtype=QType.F16):
    @classmethod
    def pack_blocks(cls, q):
        return q.codes.to(torch.float16).contiguous().view(torch.uint8)

    @classmethod
    def unpack_blocks(cls, raw):
        return QuantizedBlocks(cls.qtype, raw.contiguous().view(torch.float16))

    @classmethod
    def values(cls, q):
        return q.codes.float()


class BF16(BlockType, qtype=QType.BF16):
    @classmethod
    def pack_blocks(cls, q):
        assert q.codes.dtype == torch.bfloat16  # the rounding is the quantizer's (ggml RNE, quiet NaN)
        return q.codes.contiguous().view(torch.uint8)

    @classmethod
    def unpack_blocks(cls, raw):
        return QuantizedBlocks(cls.qtype, raw.contiguous().view(torch.bfloat16))

    @classmethod
    def values(cls, q):
        return q.codes.float()


# ---- 32-element blocks ---------------------------------------------------------------------------


class Q8_0(BlockType, qtype=QType.Q8_0):
    @classmethod
    def pack_blocks(cls, q):
        return cls.layout.join_fields({"d": q.d[:, None], "qs": q.codes.to(torch.int8)})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        return QuantizedBlocks(cls.qtype, f["qs"], d=_d(f))

    @classmethod
    def values(cls, q):
        return q.codes.float() * _f16(q.d)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Element j in the low nibble of byte j, element j+16 in the high nibble (Q4_0/Q4_1/Q5_*)."""
    return _or_shifted((codes & 0xF).reshape(-1, 2, 16), 1, 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    return _split_shifted(qs, 1, 2, 4).reshape(qs.shape[0], 32)


def _fifth_bits(codes: torch.Tensor) -> torch.Tensor:
    """Bit 4 of element j -> bit j of the little-endian uint32 ``qh`` (Q5_0/Q5_1)."""
    return _or_shifted((codes >> 4).reshape(-1, 4, 8), 2, 1)


def _unfifth(qh: torch.Tensor) -> torch.Tensor:
    return _split_shifted(qh, 2, 8, 1).reshape(qh.shape[0], 32) << 4


class Q4_0(BlockType, qtype=QType.Q4_0):
    @classmethod
    def pack_blocks(cls, q):
        return cls.layout.join_fields({"d": q.d[:, None], "qs": _nibbles(q.codes)})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        return QuantizedBlocks(cls.qtype, _unnibble(f["qs"]), d=_d(f))

    @classmethod
    def values(cls, q):
        return (q.codes.float() - 8) * _f16(q.d)


class Q4_1(BlockType, qtype=QType.Q4_1):
    @classmethod
    def pack_blocks(cls, q):
        return cls.layout.join_fields({"d": q.d[:, None], "m": q.m[:, None], "qs": _nibbles(q.codes)})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        return QuantizedBlocks(cls.qtype, _unnibble(f["qs"]), d=_d(f), m=_d(f, "m"))

    @classmethod
    def values(cls, q):
        return q.codes.float() * _f16(q.d) + _f16(q.m)


class Q5_0(BlockType, qtype=QType.Q5_0):
    @classmethod
    def pack_blocks(cls, q):
        return cls.layout.join_fields({"d": q.d[:, None], "qh": _fifth_bits(q.codes), "qs": _nibbles(q.codes)})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        return QuantizedBlocks(cls.qtype, _unnibble(f["qs"]) | _unfifth(f["qh"]), d=_d(f))

    @classmethod
    def values(cls, q):
        return (q.codes.float() - 16) * _f16(q.d)


class Q5_1(BlockType, qtype=QType.Q5_1):
    @classmethod
    def pack_blocks(cls, q):
        return cls.layout.join_fields({"d": q.d[:, None], "m": q.m[:, None], "qh": _fifth_bits(q.codes),
                                       "qs": _nibbles(q.codes)})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        return QuantizedBlocks(cls.qtype, _unnibble(f["qs"]) | _unfifth(f["qh"]), d=_d(f), m=_d(f, "m"))

    @classmethod
    def values(cls, q):
        return q.codes.float() * _f16(q.d) + _f16(q.m)


# ---- K-quant super-blocks of 256 ----------------------------------------------------------------


def _crumbs(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes of each 128-element half: byte 32h + l holds elements 128h + l + 32k in bits 2k
    (Q2_K/Q3_K ``qs``, TQ2_0 ``qs``)."""
    return _or_shifted((codes & 3).reshape(-1, 2, 4, 32), 2, 2).reshape(-1, 64)


def _uncrumb(qs: torch.Tensor) -> torch.Tensor:
    return _split_shifted(qs.reshape(-1, 2, 32), 2, 4, 2).reshape(qs.shape[0], 256)


def _pack_scale_min_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes (inverse of ggml's get_scale_min_k4)."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _unpack_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, mid, hi = s[:, :4], s[:, 4:8], s[:, 8:]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, mn


def _k_values(q: QuantizedBlocks) -> torch.Tensor:
    """value = (d*sc)*q - dmin*mn per sub-block, as dequantize_row_q{2,4,5}_K compute it."""
    n_sub = q.scales.shape[1]
    dl = (_f16(q.d) * q.scales.float())[:, :, None]
    ml = (_f16(q.dmin) * q.mins.float())[:, :, None]
    return (dl * _sub_blocks(q.codes.float(), n_sub) - ml).reshape(q.n_blocks, -1)


class Q2_K(BlockType, qtype=QType.Q2_K):
    @classmethod
    def pack_blocks(cls, q):
        scales = (q.scales.to(torch.uint8) & 0xF) | (q.mins.to(torch.uint8) << 4)
        return cls.layout.join_fields({"scales": scales, "qs": _crumbs(q.codes), "d": q.d[:, None],
                                       "dmin": q.dmin[:, None]})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        s = f["scales"]  # low nibble: scale of sub-block j, high nibble: its min
        return QuantizedBlocks(cls.qtype, _uncrumb(f["qs"]), d=_d(f), dmin=_d(f, "dmin"), scales=s & 0xF,
                               mins=s >> 4)

    @classmethod
    def values(cls, q):
        return _k_values(q)


class Q3_K(BlockType, qtype=QType.Q3_K):
    @classmethod
    def pack_blocks(cls, q):
        codes = q.codes.to(torch.uint8)
        # the high bit of element 32b + m is bit b of hmask[m]
        hmask = _or_shifted((codes >> 2).reshape(-1, 8, 32), 1, 1)
        sc = q.scales.to(torch.uint8)
        low = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
        high = _or_shifted((sc >> 4).reshape(-1, 4, 4), 1, 2)  # scale j's top bits: byte 8 + j%4, bits 2*(j//4)
        return cls.layout.join_fields({"hmask": hmask, "qs": _crumbs(codes),
                                       "scales": torch.cat([low, high], dim=1), "d": q.d[:, None]})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        s = f["scales"]
        low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
        high = _split_shifted(s[:, 8:], 1, 4, 2).reshape(-1, 16)
        hbit = _split_shifted(f["hmask"], 1, 8, 1).reshape(-1, 256)
        return QuantizedBlocks(cls.qtype, _uncrumb(f["qs"]) | (hbit << 2), d=_d(f), scales=low | (high << 4))

    @classmethod
    def values(cls, q):
        sc = q.scales.to(torch.int16) - 32
        codes = q.codes.to(torch.int16) - 4
        dl = (_f16(q.d) * sc.float())[:, :, None]
        return (dl * _sub_blocks(codes.float(), 16)).reshape(-1, 256)


class Q4_K(BlockType, qtype=QType.Q4_K):
    @classmethod
    def pack_blocks(cls, q):
        # byte 32c + l: element 64c + l in the low nibble, element 64c + 32 + l in the high nibble
        qs = _or_shifted(q.codes.to(torch.uint8).reshape(-1, 4, 2, 32), 2, 4).reshape(-1, 128)
        return cls.layout.join_fields({"d": q.d[:, None], "dmin": q.dmin[:, None],
                                       "scales": _pack_scale_min_k4(q.scales, q.mins), "qs": qs})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        codes = _split_shifted(f["qs"].reshape(-1, 4, 32), 2, 2, 4).reshape(-1, 256)
        sc, mn = _unpack_scale_min_k4(f["scales"])
        return QuantizedBlocks(cls.qtype, codes, d=_d(f), dmin=_d(f, "dmin"), scales=sc, mins=mn)

    @classmethod
    def values(cls, q):
        return _k_values(q)


class Q5_K(BlockType, qtype=QType.Q5_K):
    @classmethod
    def pack_blocks(cls, q):
        codes = q.codes.to(torch.uint8)
        qs = _or_shifted((codes & 0xF).reshape(-1, 4, 2, 32), 2, 4).reshape(-1, 128)
        qh = _or_shifted((codes >> 4).reshape(-1, 8, 32), 1, 1)  # bit k of qh[l] = bit 4 of element 32k + l
        return cls.layout.join_fields({"d": q.d[:, None], "dmin": q.dmin[:, None],
                                       "scales": _pack_scale_min_k4(q.scales, q.mins), "qh": qh, "qs": qs})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        low = _split_shifted(f["qs"].reshape(-1, 4, 32), 2, 2, 4).reshape(-1, 256)
        high = _split_shifted(f["qh"], 1, 8, 1).reshape(-1, 256)
        sc, mn = _unpack_scale_min_k4(f["scales"])
        return QuantizedBlocks(cls.qtype, low | (high << 4), d=_d(f), dmin=_d(f, "dmin"), scales=sc, mins=mn)

    @classmethod
    def values(cls, q):
        return _k_values(q)


class Q6_K(BlockType, qtype=QType.Q6_K):
    @classmethod
    def pack_blocks(cls, q):
        codes = q.codes.to(torch.uint8).reshape(-1, 2, 4, 32)  # (n, half, quarter, l)
        low = codes & 0xF
        ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(-1, 128)
        qh = _or_shifted(codes >> 4, 2, 2).reshape(-1, 64)
        return cls.layout.join_fields({"ql": ql, "qh": qh, "scales": q.scales.to(torch.int8), "d": q.d[:, None]})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        ql = f["ql"].reshape(-1, 2, 2, 32)
        low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # (n, half, quarter, l)
        high = _split_shifted(f["qh"].reshape(-1, 2, 32), 2, 4, 2)
        return QuantizedBlocks(cls.qtype, (low | (high << 4)).reshape(-1, 256), d=_d(f), scales=f["scales"])

    @classmethod
    def values(cls, q):
        codes = q.codes.to(torch.int16) - 32
        dl = (_f16(q.d) * q.scales.float())[:, :, None]
        return (dl * _sub_blocks(codes.float(), 16)).reshape(-1, 256)


# ---- ternary -------------------------------------------------------------------------------------

_POW3 = (81, 27, 9, 3, 1)  # the first element of a byte goes to the most significant trit


def _trits_to_byte(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Base-3 digits along ``dim``, most significant first (4 digits get an implicit trailing 0) ->
    the fixed-point byte ceil(q*256/243) of quantize_row_tq1_0_ref."""
    weights = torch.tensor(_POW3[: t.shape[dim]], dtype=torch.int32, device=t.device)
    shape = [1] * t.dim()
    shape[dim] = -1
    q = (t.to(torch.int32) * weights.reshape(shape)).sum(dim)
    return ((q * 256 + 242) // 243).to(torch.uint8)


def _byte_to_trits(b: torch.Tensor, count: int) -> torch.Tensor:
    """(n, m) bytes -> (n, count, m) trits, as dequantize_row_tq1_0: ((uint8)(b*3^k) * 3) >> 8."""
    pow3 = torch.tensor([1, 3, 9, 27, 81][:count], dtype=torch.int32, device=b.device)[None, :, None]
    q = (b.to(torch.int32)[:, None, :] * pow3) & 0xFF
    return ((q * 3) >> 8).to(torch.uint8)


class TQ1_0(BlockType, qtype=QType.TQ1_0):
    @classmethod
    def pack_blocks(cls, q):
        t = q.codes.to(torch.int32)
        qs0 = _trits_to_byte(t[:, :160].reshape(-1, 5, 32), 1)  # byte m: elements m + 32n
        qs1 = _trits_to_byte(t[:, 160:240].reshape(-1, 5, 16), 1)  # byte m: elements 160 + m + 16n
        qh = _trits_to_byte(t[:, 240:].reshape(-1, 4, 4), 1)  # byte j: elements 240 + j + 4n
        return cls.layout.join_fields({"qs": torch.cat([qs0, qs1], dim=1), "qh": qh, "d": q.d[:, None]})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        qs = f["qs"]
        t = torch.cat([_byte_to_trits(qs[:, :32], 5).reshape(-1, 160),
                       _byte_to_trits(qs[:, 32:], 5).reshape(-1, 80),
                       _byte_to_trits(f["qh"], 4).reshape(-1, 16)], dim=1)
        return QuantizedBlocks(cls.qtype, t, d=_d(f))

    @classmethod
    def values(cls, q):
        return (q.codes.to(torch.int16) - 1).float() * _f16(q.d)


class TQ2_0(BlockType, qtype=QType.TQ2_0):
    @classmethod
    def pack_blocks(cls, q):
        return cls.layout.join_fields({"qs": _crumbs(q.codes.to(torch.uint8)), "d": q.d[:, None]})

    @classmethod
    def unpack_blocks(cls, raw):
        f = cls.layout.split_fields(raw)
        return QuantizedBlocks(cls.qtype, _uncrumb(f["qs"]), d=_d(f))

    @classmethod
    def values(cls, q):
        return (q.codes.to(torch.int16) - 1).float() * _f16(q.d)
