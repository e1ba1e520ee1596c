"""Kernels over TQ1_0's stored form (a ``trits`` :class:`~cpmkit.kernels.layout.AffineLayout`, 1.69 bits per
weight): a streaming GEMV for decode batches (M <= 4) and a dequantizer for the dense path of larger batches.

Per 256 weights along K a column holds 13 int32 words: 8 + 4 words of TQ1_0's ``qs`` (five trits a byte) and
one of its ``qh`` (four), with the fp16 scale ``d`` (layout and weight order in ``cpmkit.kernels.layout``). The
GEMV keeps :mod:`cpmkit.kernels.gemv_stream`'s grid, lanes (four columns each, one 128-bit load per code row)
and in-kernel split-K reduction, with one TQ1_0 block per K step, read in four runs (three of four ``qs``
words, then ``qh``'s one word) so that few partial sums are live at once. A word's bytes are split into two 16-bit
lanes (bytes 0 and 2, bytes 1 and 3) so that one multiply advances two bytes to their next trit: with
``c_0 = b`` and ``c_n = 3 c_{n-1} mod 256`` (``b * 3**n mod 256``, what TQ1_0's reader forms), trit ``n`` is
bits 8-9 of ``3 c_n``, shifted straight into the mantissa of ``f = 1 + t / 4``. Per weight that is half a
multiply and half a mask, a shift, a LOP3 and an FFMA; the block's scale is applied to the partial sums::

    sum_k x_k d (t_k - 1) = d (4 sum_k x_k f_k - 5 sum_k x_k)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpmkit.kernels.gemv_stream import (
    MAX_M,
    StreamConfig,
    _reduce_splits,
    _store,
    _x_pair,
    _x_sum,
)
from cpmkit.kernels.layout import TRIT_BLOCK, TRIT_WORDS, PackedWeight
from cpmkit.kernels.splitk import COUNTERS

TRITS_MAX_M = 16  # rows the trits GEMV takes, MAX_M per launch; the dense path above

BYTE_LANES = 0x00FF00FF  # bytes 0 and 2 of a word, each alone in a 16-bit lane
TRIT_FIELD = 3 << 21  # where a trit sits in the float 1 + t / 4


def reference_trits(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``qs uint8 [..., 48]`` and ``qh uint8 [..., 4]`` of TQ1_0 blocks -> trits ``[..., 256]``
    (0, 1, 2) in weight order."""
    out = []
    for data, trits in ((qs[..., :32], 5), (qs[..., 32:], 5), (qh, 4)):
        cur = data.to(torch.int32)
        for _ in range(trits):
            out.append((cur * 3) >> 8)
            cur = (cur * 3) & 0xFF
    return torch.cat(out, dim=-1)


@triton.jit
def _mantissa(v, trit_field):
    return ((v & trit_field) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _x_quad(x_ptr, row: tl.constexpr, stride_xm, M, k, rows, X_PAIRS: tl.constexpr):
    """x[row, k + 4 r + b] for b = 0..3 as float32 ``[WORDS]`` each (zeros past M); bf16 pairs come as one
    contiguous ``[WORDS, 2]`` load of int32 (vectorized), not two."""
    if X_PAIRS:
        valid = (rows * 0 + row) < M
        offs = k // 2 + rows[:, None] * 2 + tl.arange(0, 2)[None, :]
        both = tl.load(x_ptr + row * stride_xm + offs, mask=valid[:, None], other=0).to(tl.uint32, bitcast=True)
        p01, p23 = tl.split(both)
        x0 = (p01 << 16).to(tl.float32, bitcast=True)
        x1 = ((p01 >> 16) << 16).to(tl.float32, bitcast=True)
        x2 = (p23 << 16).to(tl.float32, bitcast=True)
        x3 = ((p23 >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        x0, x1 = _x_pair(x_ptr, row, stride_xm, M, k, rows, 0, 4, X_PAIRS)
        x2, x3 = _x_pair(x_ptr, row, stride_xm, M, k, rows, 2, 4, X_PAIRS)
    return x0, x1, x2, x3


@triton.jit
def _part(words, x_ptr, stride_xm, M, k_first, byte_lanes, trit_field,
          TRITS: tl.constexpr, span, BLOCK_M: tl.constexpr, X_PAIRS: tl.constexpr):
    """``sum_k x[row, k] f_k`` over one part of a block for rows 0..3 (``[BLOCK_N]`` each; zero past BLOCK_M):
    trit n of byte b of word r is weight ``k_first + n * span + 4 r + b``."""
    WORDS: tl.constexpr = words.shape[0]
    rows = tl.arange(0, WORDS)
    even = words & byte_lanes  # bytes 0 and 2
    odd = (words >> 8) & byte_lanes  # bytes 1 and 3
    dot0 = tl.zeros(words.shape, dtype=tl.float32)
    dot1 = tl.zeros(words.shape, dtype=tl.float32)
    dot2 = tl.zeros(words.shape, dtype=tl.float32)
    dot3 = tl.zeros(words.shape, dtype=tl.float32)
    for n in tl.static_range(TRITS):
        even = even * 3  # the trits are bits 8-9 of each lane
        odd = odd * 3
        f0 = _mantissa(even << 13, trit_field)
        f1 = _mantissa(odd << 13, trit_field)
        f2 = _mantissa(even >> 3, trit_field)
        f3 = _mantissa(odd >> 3, trit_field)
        even = even & byte_lanes  # c_n mod 256 for the next trit
        odd = odd & byte_lanes
        k = k_first + n * span
        x0, x1, x2, x3 = _x_quad(x_ptr, 0, stride_xm, M, k, rows, X_PAIRS)
        dot0 += x0[:, None] * f0
        dot0 += x1[:, None] * f1
        dot0 += x2[:, None] * f2
        dot0 += x3[:, None] * f3
        if BLOCK_M > 1:
            x0, x1, x2, x3 = _x_quad(x_ptr, 1, stride_xm, M, k, rows, X_PAIRS)
            dot1 += x0[:, None] * f0
            dot1 += x1[:, None] * f1
            dot1 += x2[:, None] * f2
            dot1 += x3[:, None] * f3
        if BLOCK_M > 2:
            x0, x1, x2, x3 = _x_quad(x_ptr, 2, stride_xm, M, k, rows, X_PAIRS)
            dot2 += x0[:, None] * f0
            dot2 += x1[:, None] * f1
            dot2 += x2[:, None] * f2
            dot2 += x3[:, None] * f3
            x0, x1, x2, x3 = _x_quad(x_ptr, 3, stride_xm, M, k, rows, X_PAIRS)
            dot3 += x0[:, None] * f0
            dot3 += x1[:, None] * f1
            dot3 += x2[:, None] * f2
            dot3 += x3[:, None] * f3
    return tl.sum(dot0, axis=0), tl.sum(dot1, axis=0), tl.sum(dot2, axis=0), tl.sum(dot3, axis=0)


@triton.jit
def _load_words(ptr, first, WORDS: tl.constexpr, N, offs_n, mask_n):
    rows = first + tl.arange(0, WORDS)
    words = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def _block_x_sum(x_ptr, row: tl.constexpr, stride_xm, M, k0, X_PAIRS: tl.constexpr):
    """The sum of x over a block's 256 weights, as four sums of 64 that each stay inside a warp (one of 256
    would be reduced across warps, through shared memory and a barrier)."""
    total = _x_sum(x_ptr, row, stride_xm, M, k0, 64, X_PAIRS)
    for q in tl.static_range(1, 4):
        total += _x_sum(x_ptr, row, stride_xm, M, k0 + q * 64, 64, X_PAIRS)
    return total


@triton.jit
def trits_kernel(
    x_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm,
    qs_ptr, qh_ptr, d_ptr, byte_lanes, trit_field,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, X_PAIRS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n_blocks = K // 256
    per_split = tl.cdiv(n_blocks, SPLIT_K)
    c_start = pid_k * per_split
    c_end = tl.minimum(c_start + per_split, n_blocks)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(c_start, c_end):
        k0 = c * 256
        # qs in three runs of four words (bytes 0-15 and 16-31: weights n * 32 + j; bytes 32-47: 160 + n * 16 + j),
        # a loop rather than unrolled so that one run's x values and partial sums are live at a time; then qh
        a0, a1, a2, a3 = _part(_load_words(qh_ptr, c, 1, N, offs_n, mask_n), x_ptr, stride_xm, M, k0 + 240,
                               byte_lanes, trit_field, 4, 4, BLOCK_M, X_PAIRS)
        for run in range(3):
            span = 32 - 16 * (run // 2)
            s0, s1, s2, s3 = _part(_load_words(qs_ptr, c * 12 + 4 * run, 4, N, offs_n, mask_n), x_ptr, stride_xm, M,
                                   k0 + 16 * run + 128 * (run // 2), byte_lanes, trit_field, 5, span, BLOCK_M, X_PAIRS)
            a0, a1, a2, a3 = a0 + s0, a1 + s1, a2 + s2, a3 + s3
        d = tl.load(d_ptr + c * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        acc0 += (4 * d) * a0 - (5 * d) * _block_x_sum(x_ptr, 0, stride_xm, M, k0, X_PAIRS)
        if BLOCK_M > 1:
            acc1 += (4 * d) * a1 - (5 * d) * _block_x_sum(x_ptr, 1, stride_xm, M, k0, X_PAIRS)
        if BLOCK_M > 2:
            acc2 += (4 * d) * a2 - (5 * d) * _block_x_sum(x_ptr, 2, stride_xm, M, k0, X_PAIRS)
            acc3 += (4 * d) * a3 - (5 * d) * _block_x_sum(x_ptr, 3, stride_xm, M, k0, X_PAIRS)

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


def trits_gemv(x: torch.Tensor, w: PackedWeight, cfg: StreamConfig) -> torch.Tensor:
    """``x [M, K]`` (M <= TRITS_MAX_M, K-contiguous rows) times ``dequant(w).T`` for a trits layout -> ``[M, N]``
    in x's dtype; more than MAX_M rows run MAX_M at a time (each launch reads the 1.69-bit weight again, still
    far less than the dense path's bf16 copy)."""
    m, k = x.shape
    assert w.layout.trits and m <= TRITS_MAX_M and k == w.k and x.stride(1) == 1, (x.shape, w.k, w.layout)
    out = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    for start in range(0, m, MAX_M):
        _launch(x[start : start + MAX_M], w, cfg, out[start : start + MAX_M])
    return out


def _launch(x: torch.Tensor, w: PackedWeight, cfg: StreamConfig, out: torch.Tensor) -> None:
    m, k = x.shape
    blocks = triton.cdiv(w.n, cfg.block_n)
    ws = torch.empty((cfg.split_k, m, w.n), dtype=torch.float32, device=x.device) if cfg.split_k > 1 else out
    counters = COUNTERS.get(x.device, blocks) if cfg.split_k > 1 else out  # unread without split-K
    pairs = x.dtype == torch.bfloat16 and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0
    trits_kernel[(blocks, cfg.split_k)](
        x.view(torch.int32) if pairs else x, out, ws, counters, m, w.n, k,
        x.stride(0) // 2 if pairs else x.stride(0), w.lo, w.hi, w.d, BYTE_LANES, TRIT_FIELD,
        triton.next_power_of_2(m), cfg.block_n, cfg.split_k, pairs,
        num_warps=cfg.num_warps,
    )


@triton.jit
def _store_trits(out_ptr, words, d, N, offs_n, mask_n, k_first,
                 TRITS: tl.constexpr, SPAN: tl.constexpr, WORDS: tl.constexpr):
    rows = tl.arange(0, WORDS)
    for b in tl.static_range(4):
        cur = (words >> (8 * b)) & 0xFF
        for n in tl.static_range(TRITS):
            cur = cur * 3
            t = (cur >> 8).to(tl.float32)
            cur = cur & 0xFF
            k = k_first + n * SPAN + rows * 4 + b
            tl.store(out_ptr + k[:, None] * N + offs_n[None, :], (d[None, :] * (t - 1)).to(out_ptr.dtype.element_ty),
                     mask=mask_n[None, :])


@triton.jit
def trits_dequant_kernel(out_ptr, N, qs_ptr, qh_ptr, d_ptr, BLOCK_N: tl.constexpr):
    """One TQ1_0 block of every column of a BLOCK_N tile -> rows ``[256 c, 256 c + 256)`` of ``W.T [K, N]``."""
    c = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    d = tl.load(d_ptr + c * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    k0 = c * 256
    _store_trits(out_ptr, _load_words(qs_ptr, c * 12, 8, N, offs_n, mask_n), d, N, offs_n, mask_n, k0, 5, 32, 8)
    _store_trits(out_ptr, _load_words(qs_ptr, c * 12 + 8, 4, N, offs_n, mask_n), d, N, offs_n, mask_n, k0 + 160,
                 5, 16, 4)
    _store_trits(out_ptr, _load_words(qh_ptr, c, 1, N, offs_n, mask_n), d, N, offs_n, mask_n, k0 + 240, 4, 4, 1)


def trits_dequantize(w: PackedWeight, out: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    """Write ``dequant(w).T`` (``[K, N]``, out's dtype) into ``out``."""
    assert w.layout.trits and out.shape == (w.k, w.n) and out.is_contiguous(), (out.shape, w.k, w.n)
    assert TRIT_WORDS == 12 and TRIT_BLOCK == 256  # the kernels' constants
    trits_dequant_kernel[(w.k // TRIT_BLOCK, triton.cdiv(w.n, block_n))](out, w.n, w.lo, w.hi, w.d, block_n)
    return out
