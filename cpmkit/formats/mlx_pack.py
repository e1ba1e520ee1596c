"""Byte layout of MLX quantized weights: codes packed into uint32 words.

Each row of codes is one little-endian, LSB-first bit stream: code ``k`` occupies bits
``[k*bits, (k+1)*bits)`` of the row, and the stream is read as little-endian uint32 words, so a
row of ``K`` codes becomes ``K*bits/32`` words. For 2, 4 and 8 bits every word holds whole codes;
3-, 5- and 6-bit codes straddle word boundaries (mlx writes them as 3-, 5- and 3-byte packs of 8, 8
and 4 codes: ``get_pack_factor`` / ``get_bytes_per_pack`` in mlx/backend/common/quantized.h, which
adds up to the same continuous stream). The same layout serves the affine codes and the 4-bit
E2M1 / 8-bit codes of the fp modes.

Vectorised over "packs" of 8 codes, which always fill exactly ``bits`` bytes: the 8 codes are
combined into one int64 (at most 48 bits for bits < 8, so no sign trouble) and cut into bytes;
8-bit codes already are the bytes.
"""

from __future__ import annotations

import sys

import torch

from cpmkit.errors import CpmkitError

PACK_BITS = (2, 3, 4, 5, 6, 8)
CODES_PER_PACK = 8  # 8 codes of b bits fill exactly b bytes
WORD_BITS = 32
# Rows per chunk are chosen so the int64 temporaries stay near this many elements.
CHUNK_ELEMENTS = 1 << 22

# uint8 <-> uint32 views below reinterpret bytes in host order; MLX's stream is little-endian.
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


def _shifts(bits: int) -> torch.Tensor:
    return torch.arange(CODES_PER_PACK, dtype=torch.int64) * bits  # bit offset of each code in its pack


def _bytes_from_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(R, K)`` -> uint8 stream ``(R, K*bits/8)``."""
    if bits == 8:
        return codes
    n, k = codes.shape
    packs = codes.reshape(n, k // CODES_PER_PACK, CODES_PER_PACK).to(torch.int64)  # (R, P, 8)
    value = (packs << _shifts(bits)).sum(dim=-1, keepdim=True)  # (R, P, 1): disjoint bits, so sum == or
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    stream = (value >> byte_shifts) & 0xFF  # (R, P, bits)
    return stream.to(torch.uint8).reshape(n, k * bits // 8)


def _codes_from_bytes(stream: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 stream ``(R, K*bits/8)`` -> uint8 codes ``(R, K)``."""
    if bits == 8:
        return stream
    n = stream.shape[0]
    packs = stream.reshape(n, k // CODES_PER_PACK, bits).to(torch.int64)  # (R, P, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    value = (packs << byte_shifts).sum(dim=-1, keepdim=True)  # (R, P, 1)
    codes = (value >> _shifts(bits)) & ((1 << bits) - 1)  # (R, P, 8)
    return codes.to(torch.uint8).reshape(n, k)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., K]`` (each ``< 2**bits``) -> uint32 words ``[..., K*bits/32]``, the
    ``.weight`` tensor MLX stores for a quantized layer."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise CpmkitError(f"MLX packing: codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise CpmkitError("MLX packing: codes must have at least one dimension")
    k = codes.shape[-1]
    width = packed_width(k, bits)
    if codes.numel() and int(codes.max()) >> bits:
        raise CpmkitError(f"MLX packing: a code is {int(codes.max())}, too large for {bits} bits")
    rows = codes.reshape(-1, k)
    out = torch.empty((rows.shape[0], width * 4), dtype=torch.uint8)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = _bytes_from_codes(rows[start : start + step], bits)
    return out.view(torch.uint32).reshape(*codes.shape[:-1], width)


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
    rows = words.contiguous().reshape(-1, width).view(torch.uint8)  # (R, width*4)
    out = torch.empty((rows.shape[0], k), dtype=torch.uint8)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = _codes_from_bytes(rows[start : start + step], bits, k)
    return out.reshape(*words.shape[:-1], k)
