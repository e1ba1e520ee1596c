"""The dense path for large batches: dequantize W once per call into ``W.T [K, N]`` in the activations' dtype,
then one dense matmul (cuBLAS on CUDA): ``y = x @ dequant(W).T``.

Once M reaches the hundreds a weight-only kernel is bound by its MMAs like any GEMM, and the tiled kernel
decodes every weight tile again for each M block; cuBLAS does the MMAs better, and the decode costs one pass
over the packed weight plus the write and read of a dense copy (``2 K N`` bytes in bf16), paid once per call
however large M is. Which batch size is large enough is a property of the GPU: ``dispatch.DEQUANT_MIN_M`` is
the default and an autotune cache measures it. The dense copy is a temporary of the call (on CUDA the caching
allocator hands the same block back every call).

The decoder is the shared ``decode_tile`` (a tile ``[BLOCK_K, BLOCK_N]`` per program; N contiguous, so the
stores are coalesced rows of W.T), or ``cpmkit.kernels.trits`` for TQ1_0's stored form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cpmkit.kernels.decode import channel_epilogue, decode_tile
from cpmkit.kernels.layout import PackedWeight
from cpmkit.kernels.trits import trits_dequantize


@dataclass(frozen=True)
class DequantConfig:
    block_k: int = 64
    block_n: int = 128
    num_warps: int = 4


@triton.jit
def dequant_kernel(
    out_ptr, N,
    lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr,
    LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    BLOCK: tl.constexpr, SUB_BLOCK: tl.constexpr, HAS_M: tl.constexpr, CHANNEL: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = decode_tile(lo_ptr, hi_ptr, d_ptr, m_ptr, sub_d_ptr, sub_m_ptr, N, k0, offs_n, mask_n,
                    LO_BITS, HI_BITS, ZERO, BLOCK, SUB_BLOCK, HAS_M, CHANNEL, BLOCK_K)
    if CHANNEL:  # d * (q - zero) + m, per output channel
        w = channel_epilogue(w, tl.full((BLOCK_K,), 1.0, tl.float32), d_ptr, m_ptr, offs_n, mask_n, HAS_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


def dequantize_t(w: PackedWeight, dtype: torch.dtype, cfg: DequantConfig) -> torch.Tensor:
    """``dequant(w).T`` as a dense ``[K, N]`` tensor of ``dtype`` on w's device, decoded by the kernels
    (``cfg.block_k`` divides K: the dispatcher's configs do)."""
    out = torch.empty((w.k, w.n), dtype=dtype, device=w.device)
    lay = w.layout
    if lay.trits:
        return trits_dequantize(w, out)
    assert w.k % cfg.block_k == 0 and cfg.block_k % 32 == 0, (w.k, cfg)
    dequant_kernel[(w.k // cfg.block_k, triton.cdiv(w.n, cfg.block_n))](
        out, w.n, w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m,
        lay.lo_bits, lay.hi_bits, lay.zero, lay.block, lay.sub_block, lay.has_m, lay.channel,
        cfg.block_k, cfg.block_n, num_warps=cfg.num_warps,
    )
    return out


def dequant_matmul(x: torch.Tensor, w: PackedWeight, cfg: DequantConfig) -> torch.Tensor:
    """``x [M, K]`` times ``dequant(w).T`` -> ``[M, N]`` in x's dtype: the weight decoded to x's dtype, then
    torch's matmul (float32 accumulation for bf16/fp16 on CUDA)."""
    return x @ dequantize_t(w, x.dtype, cfg)
