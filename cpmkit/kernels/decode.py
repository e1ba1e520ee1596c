"""The tile decoder shared by every dequant-GEMM strategy.

``decode_tile`` turns rows ``[k0, k0 + BLOCK_K)`` and output channels ``offs_n`` of a
:class:`~cpmkit.kernels.layout.PackedWeight` into a float32 tile ``W.T[k0:k0+BLOCK_K, offs_n]``
(``[BLOCK_K, BLOCK_N]``), specialised at compile time by the layout's constants. Its torch reference
is the format's own dequantizer (``QuantLinear.dequantize``); the tests hold both to the same oracle.

Everything is loaded compactly and expanded in registers, never gathered per element: a code plane as
``[BLOCK_K * bits / 32, BLOCK_N]`` int32 words, split by a shift vector into ``[words, 32 / bits,
BLOCK_N]`` and merged into ``[BLOCK_K, BLOCK_N]``; scales as one row per group in the tile, repeated
along K the same way. Requirements (checked by the host): ``BLOCK_K`` a power of two, a multiple of 32
and a divisor of K, so a tile never straddles a word and either holds whole groups or lies inside one.
Every packed tensor is ``[rows, N]`` contiguous, so one row stride (N) serves them all.

A ``CHANNEL`` layout's tile is ``q - ZERO`` alone; the kernel sums it against x and :func:`channel_epilogue`
applies the per-channel ``d`` (and ``m`` times the sum of x) once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _repeat_rows(t, FACTOR: tl.constexpr):
    """``[R, C]`` -> ``[R * FACTOR, C]``, every row repeated FACTOR times in place."""
    R: tl.constexpr = t.shape[0]
    C: tl.constexpr = t.shape[1]
    if FACTOR == 1:
        out = t
    else:
        out = tl.reshape(tl.broadcast_to(t[:, None, :], (R, FACTOR, C)), (R * FACTOR, C))
    return out


@triton.jit
def _load_plane(ptr, N, k0, offs_n, mask_n, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of one bit plane: int32 ``[BLOCK_K, BLOCK_N]``, field e of word r is k = r * 32/BITS + e."""
    PER_WORD: tl.constexpr = 32 // BITS
    rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    # int32 >> is arithmetic; the mask drops the copied sign bits.
    fields = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (BLOCK_K, words.shape[1]))


@triton.jit
def _load_groups(ptr, N, k0, offs_n, mask_n, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, ROWS_OUT: tl.constexpr):
    """Per-group values covering the tile, as float32 ``[ROWS_OUT, BLOCK_N]`` (ROWS_OUT >= groups in tile)."""
    ROWS_IN: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP  # 1 when the tile lies inside one group
    rows = k0 // GROUP + tl.arange(0, ROWS_IN)
    # cast right after the load: the interpreter computes bf16 on raw bits
    vals = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0).to(tl.float32)
    return _repeat_rows(vals, ROWS_OUT // ROWS_IN)


@triton.jit
def decode_tile(
    # packed weight (unused pointers may be None)
    lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr,
    # where
    N, k0, offs_n, mask_n,
    # layout (AffineLayout)
    LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    BLOCK: tl.constexpr, SUB_BLOCK: tl.constexpr, HAS_M: tl.constexpr, CHANNEL: tl.constexpr,
    # tile
    BLOCK_K: tl.constexpr,
):
    """float32 ``[BLOCK_K, BLOCK_N]``: ``scale * q + offset`` with per-sub-block ``scale = d * sub_d``
    and ``offset = m * sub_m - ZERO * scale``; for a CHANNEL layout ``q - ZERO``."""
    q = _load_plane(lo_ptr, N, k0, offs_n, mask_n, LO_BITS, BLOCK_K)
    if HI_BITS > 0:
        q = q | (_load_plane(hi_ptr, N, k0, offs_n, mask_n, HI_BITS, BLOCK_K) << LO_BITS)
    if CHANNEL:
        return q.to(tl.float32) - ZERO

    N_SUB: tl.constexpr = (BLOCK_K + SUB_BLOCK - 1) // SUB_BLOCK  # sub-blocks in the tile (>= 1)
    scale = _load_groups(d_ptr, N, k0, offs_n, mask_n, BLOCK, BLOCK_K, N_SUB)
    if SUB_BLOCK != BLOCK:
        scale = scale * _load_groups(sub_d_ptr, N, k0, offs_n, mask_n, SUB_BLOCK, BLOCK_K, N_SUB)
    offset = scale * (-ZERO)
    if HAS_M:
        m = _load_groups(m_ptr, N, k0, offs_n, mask_n, BLOCK, BLOCK_K, N_SUB)
        if SUB_BLOCK != BLOCK:
            m = m * _load_groups(sub_m_ptr, N, k0, offs_n, mask_n, SUB_BLOCK, BLOCK_K, N_SUB)
        offset = offset + m
    FACTOR: tl.constexpr = BLOCK_K // N_SUB
    return q.to(tl.float32) * _repeat_rows(scale, FACTOR) + _repeat_rows(offset, FACTOR)


@triton.jit
def channel_epilogue(acc, x_sum, d_ptr, m_ptr, offs_n, mask_n, HAS_M: tl.constexpr):
    """``acc [BLOCK_M, BLOCK_N]`` (sums of x times ``q - ZERO``) scaled per output channel, plus ``m`` times
    ``x_sum [BLOCK_M]`` (the rows' sums of x over the same K) when the layout has m."""
    d = tl.load(d_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
    out = acc * d[None, :]
    if HAS_M:
        m = tl.load(m_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
        out = out + x_sum[:, None] * m[None, :]
    return out
