"""Dequant GEMV with split-K, for decode-sized batches (M <= MAX_M = 16): ``y = x @ dequant(W).T``.

Operands:
    x      ``[M, K]`` bfloat16 / float16 / float32, row stride ``stride_xm``, contiguous along K
    W      a :class:`~cpmkit.kernels.layout.PackedWeight` for ``W [N, K]``: int32 code planes
           ``[K * bits / 32, N]`` plus per-group scales ``[K / group, N]``, all K-major with N contiguous
           (layout and decoding rule in ``cpmkit.kernels.layout``)
    out    ``[M, N]`` in x's dtype; with SPLIT_K > 1 the float32 slices ``ws [SPLIT_K, M, N]`` are added in the
           kernel (``cpmkit.kernels.splitk``)

Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: program ``(j, s)`` owns output channels ``j*BLOCK_N ...`` and the
``s``-th contiguous slice of the K tiles. At batch 1 the work is bound by reading W once, so the design
keeps HBM busy: every program streams ``[BLOCK_K, BLOCK_N]`` weight tiles with coalesced row loads
(N is contiguous), decodes them in registers to float32, and multiplies on CUDA cores in float32
against all M rows of x at once (the decoded tile is reused M times). Split-K supplies enough programs
when N is small (k/v projections: N = 256); partial sums go to separate slices instead of
``atomic_add`` so results are deterministic.

Compiled for sm_90: no register spills; per K step the code tile crosses shared memory once
(``convert_layout`` from the 128-bit-per-lane load layout to the one-column-per-lane unpack layout).
Measured once on an H100 (README, bench/kernels_gpu.py): correct, but Q4_K streams at only 26 % of copy
bandwidth with the default tiles and 35 % autotuned; that conversion and the decode's instruction count
are the first suspects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from cpmkit.kernels.decode import channel_epilogue, decode_tile
from cpmkit.kernels.layout import AffineLayout, PackedWeight
from cpmkit.kernels.splitk import outputs, store_tile

MAX_M = 16  # rows of x a program holds; dispatch sends larger batches to the tiled GEMM


def reference_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``x [M, K]`` times the dequantized ``weight [N, K]`` (float32) -> ``[M, N]`` in x's dtype,
    accumulated in float32 like the kernel."""
    return (x.float() @ weight.float().T).to(x.dtype)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def gemv_kernel(
    # activations [M, K], output [M, N], split-K slices and counters
    x_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm,
    # packed weight
    lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr,
    # layout (AffineLayout)
    LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    BLOCK: tl.constexpr, SUB_BLOCK: tl.constexpr, HAS_M: tl.constexpr, CHANNEL: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)

    n_tiles = K // BLOCK_K
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(per_split * (pid_k + 1), n_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # only for a CHANNEL layout with m
    for t in range(pid_k * per_split, t_end):
        k0 = t * BLOCK_K
        w = decode_tile(lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr, N, k0, offs_n, mask_n,
                        LO_BITS, HI_BITS, ZERO, BLOCK, SUB_BLOCK, HAS_M, CHANNEL, BLOCK_K)  # [BLOCK_K, BLOCK_N]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0)
        x = x.to(tl.float32)  # [BLOCK_M, BLOCK_K]
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        if CHANNEL and HAS_M:
            x_sum += tl.sum(x, axis=1)
    if CHANNEL:
        acc = channel_epilogue(acc, x_sum, d_ptr, m_ptr, offs_n, mask_n, HAS_M)

    store_tile(out_ptr, ws_ptr, count_ptr, acc, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K)


def _launch(x: torch.Tensor, w: PackedWeight, cfg: GemvConfig) -> torch.Tensor:
    m, k = x.shape
    lay = w.layout
    assert not lay.trits, "a trits layout runs cpmkit.kernels.trits or the dense path"
    assert m <= MAX_M and k == w.k and x.stride(1) == 1, (x.shape, x.stride(), w.k)
    assert k % cfg.block_k == 0 and cfg.block_k % 32 == 0, (k, cfg)
    assert cfg.split_k * m * w.n < 2**31, "int32 output offsets"  # split-K is only chosen for small grids
    tiles = triton.cdiv(w.n, cfg.block_n)
    out, ws, counters = outputs(x, w.n, cfg.split_k, tiles)
    gemv_kernel[(tiles, cfg.split_k)](
        x, out, ws, counters, m, w.n, k, x.stride(0),
        w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m,
        lay.lo_bits, lay.hi_bits, lay.zero, lay.block, lay.sub_block, lay.has_m, lay.channel,
        triton.next_power_of_2(m), cfg.block_n, cfg.block_k, cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


@torch.library.custom_op("cpmkit::dequant_gemv", mutates_args=())
def dequant_gemv(
    x: torch.Tensor,
    lo: torch.Tensor, hi: Optional[torch.Tensor], d: torch.Tensor, m: Optional[torch.Tensor],
    sub_d: Optional[torch.Tensor], sub_m: Optional[torch.Tensor],
    lo_bits: int, hi_bits: int, zero: int, block: int, sub_block: int, has_m: bool, channel: bool,
    block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int,
) -> torch.Tensor:
    layout = AffineLayout(lo_bits, hi_bits, zero, block, sub_block, has_m, channel)
    w = PackedWeight(layout, lo.shape[1], x.shape[1], lo, hi, d, m, sub_d, sub_m)
    return _launch(x, w, GemvConfig(block_n, block_k, split_k, num_warps, num_stages))


@dequant_gemv.register_fake
def _(x, lo, hi, d, m, sub_d, sub_m, *meta):
    return x.new_empty((x.shape[0], lo.shape[1]))


def gemv(x: torch.Tensor, w: PackedWeight, cfg: GemvConfig) -> torch.Tensor:
    """``x [M, K]`` (M <= MAX_M) times ``dequant(w).T`` -> ``[M, N]`` in x's dtype: launched directly in
    eager mode, through the custom op (which torch.compile can trace) when compiling. The op's dispatch
    costs tens of microseconds of host time per call, more than the kernel on most layers."""
    if not torch.compiler.is_compiling():
        return _launch(x, w, cfg)
    lay = w.layout
    return dequant_gemv(x, w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m,
                        lay.lo_bits, lay.hi_bits, lay.zero, lay.block, lay.sub_block, lay.has_m, lay.channel,
                        cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages)
