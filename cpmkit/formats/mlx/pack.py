"""Byte layout of MLX quantized weights: codes packed into uint32 words.

Each row of codes is one little-endian, LSB-first bit stream: code ``k`` occupies bits
``[k*bits, (k+1)*bits)`` of the row, and the stream is read as little-endian uint32 words, so a
row of ``K`` codes becomes ``K*bits/32`` words. For 2, 4 and 8 bits every word holds whole codes;
3-, 5- and 6-bit codes straddle word boundaries (mlx writes them as 3-, 5- and 3-byte packs of 8, 8
and 4 codes: ``get_pack_factor`` / ``get_bytes_per_pack`` in mlx/backend/common/quantized.h, which
adds up to the same continuous stream). The same layout serves the affine codes and the 4-bit
E2M1 / 8-bit codes of the fp modes.

Vectorised over "packs" of 8 codes, which always fill exactly ``bits`` bytes: the 8 code bytes are
read as one int64 and merged by halving (pairs of codes in 16-bit lanes, then 4 in 32-bit lanes, then 8),
after which the pack's ``bits`` bytes are the low bytes of the int64; unpacking runs the steps backwards.
8-bit codes already are the bytes.
"""

from __future__ import annotations

import sys

import torch

from cpmkit.errors import CpmkitError

PACK_BITS = (2, 3, 4, 5, 6, 8)
CODES_PER_PACK = 8  # 8 codes of b bits fill exactly b bytes
WORD_BITS = 32
# Packs (int64s) merged per step, and bytes copied per step at 8 bits: torch runs an op on fewer than 32768
# elements (at::internal::GRAIN_SIZE) on the calling thread; a larger one waits for its OpenMP team, which
# costs milliseconds per op on a busy machine (see cpmkit.quant.affine).
STEP_PACKS = (1 << 15) - 1
INT64_BITS = 64

# uint8 <-> uint32/int64 views below reinterpret bytes in host order; MLX's stream is little-endian.
assert sys.byteorder == "little", "cpmkit's MLX packing assumes a little-endian host"


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise CpmkitError(f"MLX packing: bits={bits} is not supported; use one of {PACK_BITS}")


def packed_width(k: int, bits: int) -> int:
    """uint32 words per row of ``k`` codes; raises CpmkitError when the row does not fill whole words."""
    _check_bits(bits)
    if (k * bits) % WORD_BITS:
        raise CpmkitError(f"MLX packing: a row of {k} {bits}-bit codes does not fill whole uint32 words")
    return k * bits // WORD_BITS


def _lane_mask(width: int, lane: int, offset: int = 0) -> int:
    """int64 (as a signed Python int) with bits ``[offset, offset + width)`` of every ``lane``-bit lane set."""
    mask = sum(((1 << width) - 1) << (start + offset) for start in range(0, INT64_BITS, lane))
    return mask - (1 << INT64_BITS) if mask >> (INT64_BITS - 1) else mask


def _halving_levels(bits: int) -> list[tuple[int, int, int]]:
    """``(shift, apart_mask, together_mask)`` per level ``half`` = 8, 16, 32 bits. At a level, each lane of
    ``2*half`` bits holds two fields of ``width = bits*half/8`` bits: the low one at offset 0, the high one at
    offset ``half`` (apart, ``apart_mask``) or right above the low one at offset ``width`` (together,
    ``together_mask``); the high field moves by ``shift = half - width``."""
    levels = []
    for half in (8, 16, 32):
        width = bits * half // 8
        levels.append((half - width, _lane_mask(width, 2 * half, half), _lane_mask(width, 2 * half, width)))
    return levels


def _move_field(x: torch.Tensor, tmp: torch.Tensor, mask: int, shift: int) -> None:
    """Move the bits of ``x`` under ``mask`` by ``shift`` (right if positive, left if negative), in place."""
    torch.bitwise_and(x, mask, out=tmp)
    x.bitwise_xor_(tmp)  # x & ~mask
    x.bitwise_or_(tmp.bitwise_right_shift_(shift) if shift > 0 else tmp.bitwise_left_shift_(-shift))


_UNITS = ((4, torch.int32), (2, torch.int16), (1, torch.uint8))  # (bytes, dtype), widest first


def _unit_columns(stream: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``(P, 8)`` (packs in int64s) or ``(P, bits)`` (packed) -> the first ``bits`` bytes of each row,
    as columns of the widest unit (int32, int16, uint8) that divides ``bits`` bytes: one strided 1-D copy
    per column is fast, while a 2-D copy of short rows pays torch's per-row overhead."""
    unit, dtype = next((size, dtype) for size, dtype in _UNITS if bits % size == 0)
    return stream.reshape(-1).view(dtype).view(stream.shape[0], -1)[:, : bits // unit]


def _copy_columns(dst: torch.Tensor, src: torch.Tensor) -> None:
    for column in range(dst.shape[1]):
        dst[:, column].copy_(src[:, column])


def pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes ``[..., K]`` (each ``< 2**bits``) -> uint32 words ``[..., K*bits/32]``, the
    ``.weight`` tensor MLX stores for a quantized layer; written into ``out`` (contiguous uint32 of
    that shape, e.g. a row block of the whole layer's words) when given.

    Raises CpmkitError for unsupported bits, a row that does not fill whole words, a bad ``out``, or a
    code ``>= 2**bits`` (checked after packing: ``out`` then holds meaningless words).
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise CpmkitError(f"MLX packing: codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise CpmkitError("MLX packing: codes must have at least one dimension")
    k = codes.shape[-1]
    shape = (*codes.shape[:-1], packed_width(k, bits))
    if out is None:
        out = torch.empty(shape, dtype=torch.uint32)
    elif out.dtype != torch.uint32 or tuple(out.shape) != shape or not out.is_contiguous():
        layout = "contiguous" if out.is_contiguous() else "strided"
        raise CpmkitError(f"MLX packing: out must be contiguous uint32 of shape {shape}, got {layout} "
                          f"{out.dtype} {tuple(out.shape)}")
    stream = out.view(torch.uint8).reshape(-1)
    # Every row fills whole words, so the rows' bit streams laid end to end are one stream.
    flat = codes.reshape(-1)
    if bits == 8:  # the codes are the bytes
        for start in range(0, flat.numel(), STEP_PACKS):
            stream[start : start + STEP_PACKS].copy_(flat[start : start + STEP_PACKS])
        return out
    if flat.storage_offset() % CODES_PER_PACK:
        flat = flat.clone()  # the int64 view below needs an 8-byte aligned start
    in_packs = flat.view(torch.int64)  # (P,): a pack's 8 codes, one per byte
    out_packs = stream.view(-1, bits)  # (P, bits): the bytes of each pack
    n_packs = in_packs.numel()
    x = torch.empty(min(n_packs, STEP_PACKS), dtype=torch.int64)
    tmp = torch.empty_like(x)
    high_bits = torch.zeros_like(x)  # OR of every code's bits above `bits`, checked once at the end
    too_large = _lane_mask(8 - bits, 8, offset=bits)
    levels = _halving_levels(bits)
    for start in range(0, n_packs, STEP_PACKS):
        n = min(STEP_PACKS, n_packs - start)
        xs, ts = x[:n], tmp[:n]
        xs.copy_(in_packs[start : start + n])
        high_bits[:n].bitwise_or_(torch.bitwise_and(xs, too_large, out=ts))
        for shift, apart_mask, _ in levels:
            _move_field(xs, ts, apart_mask, shift)
        dst = _unit_columns(out_packs[start : start + n], bits)
        if dst.shape[1] == 1:  # 2 or 4 bytes: the int64's low half or quarter, by a truncating conversion
            dst[:, 0].copy_(xs)
        else:
            _copy_columns(dst, _unit_columns(xs.view(torch.uint8).view(n, 8), bits))
    if high_bits.any():
        raise CpmkitError(f"MLX packing: a code is {int(codes.max())}, too large for {bits} bits")
    return out


def unpack_codes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint32 words ``[..., K*bits/32]`` -> uint8 codes ``[..., K]``."""
    width = packed_width(k, bits)
    if words.dtype not in (torch.uint32, torch.int32):
        raise CpmkitError(f"MLX unpacking: packed weight must be uint32, got {words.dtype}")
    if words.dim() == 0 or words.shape[-1] != width:
        raise CpmkitError(
            f"MLX unpacking: packed weight has shape {tuple(words.shape)}, expected last dimension {width} "
            f"for {k} {bits}-bit codes"
        )
    lead = tuple(words.shape[:-1])
    stream = words.contiguous().view(torch.uint8).reshape(-1)
    if bits == 8:
        return stream.clone().reshape(*lead, k)
    packs = stream.view(-1, bits)  # (P, bits)
    n_packs = packs.shape[0]
    out = torch.empty(n_packs, dtype=torch.int64, device=words.device)  # (P,): a pack's 8 codes, one per byte
    x = torch.empty(min(n_packs, STEP_PACKS), dtype=torch.int64, device=words.device)
    tmp = torch.empty_like(x)
    levels = _halving_levels(bits)
    for start in range(0, n_packs, STEP_PACKS):
        n = min(STEP_PACKS, n_packs - start)
        xs, ts = x[:n], tmp[:n]
        dst = _unit_columns(xs.zero_().view(torch.uint8).view(n, 8), bits)
        _copy_columns(dst, _unit_columns(packs[start : start + n], bits))
        for shift, _, together_mask in reversed(levels):
            _move_field(xs, ts, together_mask, -shift)
        out[start : start + n].copy_(xs)
    return out.view(torch.uint8).reshape(*lead, k)
