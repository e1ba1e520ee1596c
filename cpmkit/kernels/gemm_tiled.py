"""Dequant GEMM with output tiles on tensor cores, for prefill-sized batches: ``y = x @ dequant(W).T``.

Operands:
    x      ``[M, K]`` bfloat16 / float16 / float32, row stride ``stride_xm``, contiguous along K
    W      a :class:`~cpmkit.kernels.layout.PackedWeight` for ``W [N, K]``: int32 code planes
           ``[K * bits / 32, N]`` plus per-group scales ``[K / group, N]``, all K-major with N contiguous
           (layout and decoding rule in ``cpmkit.kernels.layout``)
    out    ``[M, N]`` in x's dtype; with SPLIT_K > 1 the float32 slices ``ws [SPLIT_K, M, N]`` are added in the
           kernel (``cpmkit.kernels.splitk``)

Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``, output tiles visited in groups of GROUP_M
row-tiles so that a decoded weight column stays in L2 while GROUP_M activation tiles use it. Per K
step a program loads an ``[BLOCK_M, BLOCK_K]`` activation tile, decodes a ``[BLOCK_K, BLOCK_N]`` weight
tile to float32 and rounds it to the activation dtype (as every weight-only kernel does before the
MMA), and accumulates ``tl.dot`` in float32. float32 activations use the exact ("ieee") dot, not TF32.
Once M reaches a few hundred the MMA work dominates and the kernel approaches the BF16 matmul speed;
the decode runs once per tile per program, so larger BLOCK_M amortises it better.
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

DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def reference_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``x [M, K]`` times the dequantized ``weight [N, K]`` rounded to x's dtype (the MMA
    operand), accumulated in float32 -> ``[M, N]`` in x's dtype."""
    return (x.float() @ weight.to(x.dtype).float().T).to(x.dtype)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def gemm_kernel(
    # activations [M, K], output [M, N], split-K slices and counters
    x_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm,
    # packed weight
    lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr,
    # layout (AffineLayout)
    LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    BLOCK: tl.constexpr, SUB_BLOCK: tl.constexpr, HAS_M: tl.constexpr, CHANNEL: tl.constexpr,
    # MMA operands
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles sweep one column of weight tiles together (L2 reuse of the decoded operand)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    n_tiles = K // BLOCK_K
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_end = tl.minimum(per_split * (pid_k + 1), n_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # only for a CHANNEL layout with m
    for t in range(pid_k * per_split, t_end):
        k0 = t * BLOCK_K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0)
        x = x.to(tl.float32)  # the interpreter computes bf16 on raw bits; a no-op round trip on GPU
        w = decode_tile(lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr, N, k0, offs_n, mask_n,
                        LO_BITS, HI_BITS, ZERO, BLOCK, SUB_BLOCK, HAS_M, CHANNEL, BLOCK_K)  # [BLOCK_K, BLOCK_N]
        a = x.to(DOT_DTYPE)
        b = w.to(DOT_DTYPE)
        if UPCAST_DOT:  # interpreter: same operand rounding, float32 product
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if CHANNEL and HAS_M:
            x_sum += tl.sum(x, axis=1)
    if CHANNEL:
        acc = channel_epilogue(acc, x_sum, d_ptr, m_ptr, offs_n, mask_n, HAS_M)

    store_tile(out_ptr, ws_ptr, count_ptr, acc, offs_m, offs_n, M, N, pid, pid_k, SPLIT_K)


def _launch(x: torch.Tensor, w: PackedWeight, cfg: GemmConfig) -> torch.Tensor:
    m, k = x.shape
    lay = w.layout
    assert not lay.trits, "a trits layout runs cpmkit.kernels.trits or the dense path"
    assert k == w.k and x.stride(1) == 1 and x.dtype in DOT_DTYPES, (x.shape, x.stride(), x.dtype, w.k)
    assert k % cfg.block_k == 0 and cfg.block_k % 32 == 0 and min(cfg.block_m, cfg.block_n) >= 16, (k, cfg)
    assert cfg.split_k * m * w.n < 2**31, "int32 output offsets"  # split-K is only chosen for small grids
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(w.n, cfg.block_n)
    out, ws, counters = outputs(x, w.n, cfg.split_k, tiles)
    gemm_kernel[(tiles, cfg.split_k)](
        x, out, ws, counters, m, w.n, k, x.stride(0),
        w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m,
        lay.lo_bits, lay.hi_bits, lay.zero, lay.block, lay.sub_block, lay.has_m, lay.channel,
        DOT_DTYPES[x.dtype], "ieee" if x.dtype == torch.float32 else "tf32",
        # Triton on CPU tensors only runs under TRITON_INTERPRET, whose bf16 dot reads raw bits.
        x.device.type != "cuda",
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


@torch.library.custom_op("cpmkit::dequant_gemm", mutates_args=())
def dequant_gemm(
    x: torch.Tensor,
    lo: torch.Tensor, hi: Optional[torch.Tensor], d: torch.Tensor, m: Optional[torch.Tensor],
    sub_d: Optional[torch.Tensor], sub_m: Optional[torch.Tensor],
    lo_bits: int, hi_bits: int, zero: int, block: int, sub_block: int, has_m: bool, channel: bool,
    block_m: int, block_n: int, block_k: int, split_k: int, group_m: int, num_warps: int, num_stages: int,
) -> torch.Tensor:
    layout = AffineLayout(lo_bits, hi_bits, zero, block, sub_block, has_m, channel)
    w = PackedWeight(layout, lo.shape[1], x.shape[1], lo, hi, d, m, sub_d, sub_m)
    return _launch(x, w, GemmConfig(block_m, block_n, block_k, split_k, group_m, num_warps, num_stages))


@dequant_gemm.register_fake
def _(x, lo, hi, d, m, sub_d, sub_m, *meta):
    return x.new_empty((x.shape[0], lo.shape[1]))


def gemm(x: torch.Tensor, w: PackedWeight, cfg: GemmConfig) -> torch.Tensor:
    """``x [M, K]`` times ``dequant(w).T`` -> ``[M, N]`` in x's dtype: launched directly in eager mode,
    through the custom op when compiling (see ``gemv_splitk.gemv``)."""
    if not torch.compiler.is_compiling():
        return _launch(x, w, cfg)
    lay = w.layout
    return dequant_gemm(x, w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m,
                        lay.lo_bits, lay.hi_bits, lay.zero, lay.block, lay.sub_block, lay.has_m, lay.channel,
                        cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.group_m,
                        cfg.num_warps, cfg.num_stages)
