"""Streaming dequant GEMV for decode batches (M <= MAX_M = 4): ``y = x @ dequant(W).T``, built to read W at
memory speed with few instructions per weight.

Operands as in :mod:`cpmkit.kernels.gemv_splitk` (a :class:`~cpmkit.kernels.layout.PackedWeight`: int32 code
planes ``[K * bits / 32, N]`` and per-group constants ``[K / group, N]``, N contiguous). Grid ``(cdiv(N,
BLOCK_N), SPLIT_K)``. ``BLOCK_N`` is 128 columns per warp (four per lane, one 128-bit load per code row), so
every K row of a tile lives in one thread: the sums over K stay in registers and nothing crosses lanes or warps
inside the K loop.

The loop walks ``CHUNK`` weights of K at a time, a span inside one scale group. A code becomes a float with no
conversion instruction: shifted into the top mantissa bits of 1.0, ``f = 1 + q / 2**bits`` (one shift and one
masked OR per weight), and the chunk's scale is applied once to the partial sum (GemLite's and Marlin's
trick)::

    sum_k x_k (scale q_k + offset) = scale 2**bits sum_k x_k f_k + (offset - scale 2**bits) sum_k x_k

so each weight costs a shift, a LOP3 and an FFMA. A per-channel (``channel``) layout loads no scale in the loop:
its ``d`` and ``m`` multiply the row's sums once at the end. Split-K partials are summed in the kernel: each split stores
its slice in float32, and the split that finishes last (an acq_rel counter per column block) adds the slices
in split order, so results do not depend on timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cpmkit.kernels.layout import TRIT_BLOCK, AffineLayout, PackedWeight
from cpmkit.kernels.splitk import COUNTERS

MAX_M = 4
MAX_CHUNK = 64
LANE_COLUMNS = 4  # int32 codes per lane: one 128-bit load per code row


@dataclass(frozen=True)
class StreamConfig:
    num_warps: int
    split_k: int
    # 1: plain loads, no barrier in the K loop; 3: Triton pipelines the loads through shared memory (cp.async),
    # at the cost of two barriers a step. Which is faster is for a GPU to say; the autotuner tries both.
    num_stages: int = 1

    @property
    def block_n(self) -> int:
        return 32 * LANE_COLUMNS * self.num_warps


MAX_WORDS = 32  # code words per lane per loop step, over all rows of x: more spills registers


def chunk(lay: AffineLayout, k: int, block_m: int = 1) -> int:
    """K weights per loop step: inside one scale group, whole code words in every plane, and at most
    MAX_WORDS partial sums per lane and column."""
    return min(lay.sub_block, MAX_CHUNK, k, MAX_WORDS // block_m * (32 // lay.lo_bits))


def field_masks(lay: AffineLayout) -> tuple[int, int]:
    """Where a code's low and high plane bits sit in the float ``1 + q / 2**bits`` (the kernel's masks)."""
    bits = lay.lo_bits + lay.hi_bits
    return ((1 << lay.lo_bits) - 1) << (23 - bits), ((1 << lay.hi_bits) - 1) << (23 - lay.hi_bits)


def supports(w: PackedWeight) -> bool:
    """Whether this kernel decodes ``w``'s layout (a trits layout has ``cpmkit.kernels.trits`` instead)."""
    c = chunk(w.layout, w.k, MAX_M)
    return not w.layout.trits and c * w.layout.lo_bits >= 32 and w.k % c == 0


def k_steps(lay: AffineLayout, k: int, block_m: int = 1) -> int:
    """K-loop iterations over the whole of K, which split-K divides (a trits layout: one per TQ1_0 block)."""
    return k // (TRIT_BLOCK if lay.trits else chunk(lay, k, block_m))


@triton.jit
def _x_pair(x_ptr, row: tl.constexpr, stride_xm, M, k0, rows, e: tl.constexpr, LO_PER: tl.constexpr,
            X_PAIRS: tl.constexpr):
    """x[row, k] and x[row, k + 1] for k = k0 + rows * LO_PER + e, as float32 ``[LO_WORDS]`` each (zeros past M).
    With X_PAIRS, x is bfloat16 viewed as int32 pairs: one load and one bit operation per value."""
    k = k0 + rows * LO_PER + e
    valid = (rows * 0 + row) < M
    if X_PAIRS:
        pair = tl.load(x_ptr + row * stride_xm + k // 2, mask=valid, other=0).to(tl.uint32, bitcast=True)
        first = (pair << 16).to(tl.float32, bitcast=True)
        second = ((pair >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        # cast right after the load: the interpreter computes bf16 on raw bits
        first = tl.load(x_ptr + row * stride_xm + k, mask=valid, other=0).to(tl.float32)
        second = tl.load(x_ptr + row * stride_xm + k + 1, mask=valid, other=0).to(tl.float32)
    return first, second


@triton.jit
def _shift(word, by: tl.constexpr):
    """``word`` shifted left by ``by`` bits (right when negative)."""
    if by >= 0:
        out = word << by
    else:
        out = word >> (-by)
    return out


@triton.jit
def _code_float(lo, hi, e: tl.constexpr, lo_mask, hi_mask, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr):
    """Field ``e`` of every code word as ``1 + q / 2**bits``: the code shifted into the top of 1.0's mantissa.
    The masks (the field's bits at that place) come as kernel arguments: as immediates, ptxas would load the
    mask into a register again before nearly every use."""
    BITS: tl.constexpr = LO_BITS + HI_BITS
    bits = _shift(lo, 23 - BITS - e * LO_BITS) & lo_mask
    if HI_BITS > 0:
        bits = bits | (_shift(hi, 23 - HI_BITS - e * HI_BITS) & hi_mask)
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _x_sum(x_ptr, row: tl.constexpr, stride_xm, M, k0, CHUNK: tl.constexpr, X_PAIRS: tl.constexpr):
    """The sum of x[row, k0 : k0 + CHUNK] (0 past M): one contiguous load a lane and a reduction inside a warp,
    instead of an add per weight."""
    if X_PAIRS:
        offs = tl.arange(0, CHUNK // 2)
        pair = tl.load(x_ptr + row * stride_xm + k0 // 2 + offs, mask=(offs * 0 + row) < M, other=0)
        pair = pair.to(tl.uint32, bitcast=True)
        x = (pair << 16).to(tl.float32, bitcast=True) + ((pair >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        offs = tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=(offs * 0 + row) < M, other=0).to(tl.float32)
    return tl.sum(x, axis=0)


@triton.jit
def _chunk_sum(dot, x_sum, scale, offset, STEP: tl.constexpr):
    """One row's contribution of a chunk: ``[BLOCK_N]`` from per-word partial sums ``dot [LO_WORDS, BLOCK_N]``
    and the chunk's sum of x."""
    return (scale * STEP) * tl.sum(dot, axis=0) + (offset - scale * STEP) * x_sum


@triton.jit
def _channel(acc, x_sum, d_ptr, m_ptr, offs_n, mask_n, HAS_M: tl.constexpr):
    """A CHANNEL layout's epilogue for one row: ``d * acc + m * x_sum`` per output channel."""
    out = acc * tl.load(d_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
    if HAS_M:
        out += x_sum * tl.load(m_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
    return out


@triton.jit
def _store(out_ptr, ws_ptr, acc, row: tl.constexpr, M, N, offs_n, mask_n, pid_k, SPLIT_K: tl.constexpr):
    """Row ``row`` of the result: the output itself, or this split's slice of the partial sums."""
    here = row * N + offs_n
    mask = mask_n & ((offs_n * 0 + row) < M)
    if SPLIT_K == 1:
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * M * N + here, acc, mask=mask)


@triton.jit
def _reduce_splits(out_ptr, ws_ptr, row: tl.constexpr, M, N, offs_n, mask_n, SPLIT_K: tl.constexpr):
    here = row * N + offs_n
    mask = mask_n & ((offs_n * 0 + row) < M)
    total = tl.zeros(offs_n.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + s * M * N + here, mask=mask, other=0, cache_modifier=".cg")
    tl.store(out_ptr + here, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def stream_kernel(
    x_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm,
    lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr, lo_mask, hi_mask,
    LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    BLOCK: tl.constexpr, SUB_BLOCK: tl.constexpr, HAS_M: tl.constexpr, CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, X_PAIRS: tl.constexpr,
):
    BITS: tl.constexpr = LO_BITS + HI_BITS
    LO_PER: tl.constexpr = 32 // LO_BITS
    LO_WORDS: tl.constexpr = CHUNK // LO_PER
    STEP: tl.constexpr = 1 << BITS  # f = 1 + q / STEP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, LO_WORDS)

    n_chunks = K // CHUNK
    per_split = tl.cdiv(n_chunks, SPLIT_K)
    c_start = pid_k * per_split
    c_end = tl.minimum(c_start + per_split, n_chunks)
    # one accumulator per row of x (BLOCK_M <= 4), each [BLOCK_N]: every sum stays inside a thread
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_sum0 = 0.0  # sums of x over the split's K, for a CHANNEL layout's m
    x_sum1 = 0.0
    x_sum2 = 0.0
    x_sum3 = 0.0
    for c in tl.range(c_start, c_end, num_stages=NUM_STAGES):
        k0 = c * CHUNK
        lo = tl.load(lo_ptr + (k0 // LO_PER + rows)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        hi = lo  # unused unless there is a high plane
        if HI_BITS > 0:
            HI_PER: tl.constexpr = 32 // HI_BITS
            first = k0 + rows * LO_PER  # the first weight of each lo word, and where it sits in the hi plane
            hi = tl.load(hi_ptr + (first // HI_PER)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            hi = hi.to(tl.uint32, bitcast=True) >> ((first % HI_PER) * HI_BITS).to(tl.uint32)[:, None]
        dot0 = tl.zeros((LO_WORDS, BLOCK_N), dtype=tl.float32)
        dot1 = tl.zeros((LO_WORDS, BLOCK_N), dtype=tl.float32)
        dot2 = tl.zeros((LO_WORDS, BLOCK_N), dtype=tl.float32)
        dot3 = tl.zeros((LO_WORDS, BLOCK_N), dtype=tl.float32)
        for e in tl.static_range(0, LO_PER, 2):
            fa = _code_float(lo, hi, e, lo_mask, hi_mask, LO_BITS, HI_BITS)  # [LO_WORDS, BLOCK_N]
            fb = _code_float(lo, hi, e + 1, lo_mask, hi_mask, LO_BITS, HI_BITS)
            xa, xb = _x_pair(x_ptr, 0, stride_xm, M, k0, rows, e, LO_PER, X_PAIRS)
            dot0 += xa[:, None] * fa  # two statements: each an FFMA
            dot0 += xb[:, None] * fb
            if BLOCK_M > 1:
                xa, xb = _x_pair(x_ptr, 1, stride_xm, M, k0, rows, e, LO_PER, X_PAIRS)
                dot1 += xa[:, None] * fa
                dot1 += xb[:, None] * fb
            if BLOCK_M > 2:
                xa, xb = _x_pair(x_ptr, 2, stride_xm, M, k0, rows, e, LO_PER, X_PAIRS)
                dot2 += xa[:, None] * fa
                dot2 += xb[:, None] * fb
                xa, xb = _x_pair(x_ptr, 3, stride_xm, M, k0, rows, e, LO_PER, X_PAIRS)
                dot3 += xa[:, None] * fa
                dot3 += xb[:, None] * fb
        if CHANNEL:  # d and m wait for the epilogue
            scale = 1.0
            offset = -ZERO * 1.0
        else:
            scale = tl.load(d_ptr + (k0 // BLOCK) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            if SUB_BLOCK != BLOCK:
                scale = scale * tl.load(sub_d_ptr + (k0 // SUB_BLOCK) * N + offs_n, mask=mask_n, other=0).to(
                    tl.float32)
            offset = scale * (-ZERO)
            if HAS_M:
                m = tl.load(m_ptr + (k0 // BLOCK) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
                if SUB_BLOCK != BLOCK:
                    m = m * tl.load(sub_m_ptr + (k0 // SUB_BLOCK) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
                offset = offset + m
        xs = _x_sum(x_ptr, 0, stride_xm, M, k0, CHUNK, X_PAIRS)
        acc0 += _chunk_sum(dot0, xs, scale, offset, STEP)
        x_sum0 += xs
        if BLOCK_M > 1:
            xs = _x_sum(x_ptr, 1, stride_xm, M, k0, CHUNK, X_PAIRS)
            acc1 += _chunk_sum(dot1, xs, scale, offset, STEP)
            x_sum1 += xs
        if BLOCK_M > 2:
            xs = _x_sum(x_ptr, 2, stride_xm, M, k0, CHUNK, X_PAIRS)
            acc2 += _chunk_sum(dot2, xs, scale, offset, STEP)
            x_sum2 += xs
            xs = _x_sum(x_ptr, 3, stride_xm, M, k0, CHUNK, X_PAIRS)
            acc3 += _chunk_sum(dot3, xs, scale, offset, STEP)
            x_sum3 += xs

    if CHANNEL:
        acc0 = _channel(acc0, x_sum0, d_ptr, m_ptr, offs_n, mask_n, HAS_M)
        if BLOCK_M > 1:
            acc1 = _channel(acc1, x_sum1, d_ptr, m_ptr, offs_n, mask_n, HAS_M)
        if BLOCK_M > 2:
            acc2 = _channel(acc2, x_sum2, d_ptr, m_ptr, offs_n, mask_n, HAS_M)
            acc3 = _channel(acc3, x_sum3, d_ptr, m_ptr, offs_n, mask_n, HAS_M)
    _store(out_ptr, ws_ptr, acc0, 0, M, N, offs_n, mask_n, pid_k, SPLIT_K)
    if BLOCK_M > 1:
        _store(out_ptr, ws_ptr, acc1, 1, M, N, offs_n, mask_n, pid_k, SPLIT_K)
    if BLOCK_M > 2:
        _store(out_ptr, ws_ptr, acc2, 2, M, N, offs_n, mask_n, pid_k, SPLIT_K)
        _store(out_ptr, ws_ptr, acc3, 3, M, N, offs_n, mask_n, pid_k, SPLIT_K)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every warp's slice is stored before one thread announces it
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split: sum every slice, in split order
            _reduce_splits(out_ptr, ws_ptr, 0, M, N, offs_n, mask_n, SPLIT_K)
            if BLOCK_M > 1:
                _reduce_splits(out_ptr, ws_ptr, 1, M, N, offs_n, mask_n, SPLIT_K)
            if BLOCK_M > 2:
                _reduce_splits(out_ptr, ws_ptr, 2, M, N, offs_n, mask_n, SPLIT_K)
                _reduce_splits(out_ptr, ws_ptr, 3, M, N, offs_n, mask_n, SPLIT_K)
            tl.atomic_xchg(count_ptr + pid_n, 0)




def stream_gemv(x: torch.Tensor, w: PackedWeight, cfg: StreamConfig) -> torch.Tensor:
    """``x [M, K]`` (M <= MAX_M, K-contiguous rows) times ``dequant(w).T`` -> ``[M, N]`` in x's dtype."""
    m, k = x.shape
    lay = w.layout
    block_m = triton.next_power_of_2(m)
    c = chunk(lay, k, block_m)
    assert m <= MAX_M and k == w.k and x.stride(1) == 1 and supports(w), (x.shape, w.k, lay)
    blocks = triton.cdiv(w.n, cfg.block_n)
    out = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    ws = torch.empty((cfg.split_k, m, w.n), dtype=torch.float32, device=x.device) if cfg.split_k > 1 else out
    counters = COUNTERS.get(x.device, blocks) if cfg.split_k > 1 else out  # unread without split-K
    pairs = x.dtype == torch.bfloat16 and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0
    stream_kernel[(blocks, cfg.split_k)](
        x.view(torch.int32) if pairs else x, out, ws, counters, m, w.n, k, x.stride(0) // 2 if pairs else x.stride(0),
        w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m, *field_masks(lay),
        lay.lo_bits, lay.hi_bits, lay.zero, lay.block, lay.sub_block, lay.has_m, lay.channel,
        block_m, cfg.block_n, c, cfg.split_k, cfg.num_stages, pairs,
        num_warps=cfg.num_warps,
    )
    return out


def default_stream_config(n: int, k: int, w: PackedWeight, target_programs: int, m: int = 1) -> StreamConfig:
    """Four warps (512 columns) for wide layers, fewer for narrow ones; split-K up to ``target_programs``."""
    warps = 4
    while warps > 1 and n <= 32 * LANE_COLUMNS * warps // 2:
        warps //= 2
    blocks = triton.cdiv(n, 32 * LANE_COLUMNS * warps)
    chunks = k_steps(w.layout, k, triton.next_power_of_2(m))
    split = 1
    while split * 2 <= chunks and blocks * split * 2 <= target_programs:
        split *= 2
    return StreamConfig(num_warps=warps, split_k=split)
