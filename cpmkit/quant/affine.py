"""MLX affine quantization: per-group scale and bias, bit-exact with ``mx.quantize`` on CPU.

Each row of ``w [..., K]`` is cut into groups of ``group_size`` consecutive elements; a group stores
``codes`` in ``[0, 2**bits - 1]`` and one ``scale`` and ``bias`` in the input dtype, and decodes as
``code * scale + bias``. The choice of scale and bias follows mlx's CPU kernel
(``quantize<T, U>`` in ``mlx/backend/cpu/quantized.cpp``), which is not plain min/max: the extreme
with the larger magnitude becomes the bias (code 0) and the scale is nudged so that 0.0 decodes exactly.
Packing the codes into uint32 words is a byte layout and lives in ``formats/mlx/pack.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpmkit.errors import CpmkitError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # mlx refuses 7 and anything outside 2..8
AFFINE_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# mlx clamps the float32 scale to this before fixing its sign (`eps` in quantize<T, U>).
SCALE_EPS = 1e-7
# Adding 1.5 * 2**23 to a float32 in [0, 255] rounds it to an integer half-to-even, as std::rint does, and
# leaves that integer in the low mantissa bits: the low byte of the sum's bit pattern is the code.
ROUND_MAGIC = 12582912.0
# The work is cut so that every torch op runs on the calling thread. torch hands an op to its OpenMP team
# when it has more elements than its grain size (a reduction already at that size): TORCH_GRAIN_SIZE for
# elementwise ops, reductions and copies, ROUND_GRAIN_SIZE for torch.round (the vectorised unary kernels'
# grain_size in ATen's UnaryOpsKernel.cpp). On a busy 2-core machine each such op waits milliseconds for
# the second thread, far longer than its work (bench/mlx_vs_mlxlm.py --parts). So the weights are reduced
# and coded in steps of fewer than TORCH_GRAIN_SIZE elements, and scales and biases are chosen for a chunk
# of fewer than TORCH_GRAIN_SIZE groups whose float32 copy (at most CHUNK_ELEMENTS, 1 MiB, unless one step
# is larger) stays cached between the two passes over it.
TORCH_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE
ROUND_GRAIN_SIZE = 2048
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class AffineSpec:
    """One MLX affine quantization setting, as written to ``config.json`` ``quantization``."""

    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in AFFINE_BITS:
            raise CpmkitError(
                f"MLX affine quantization: bits={self.bits} is not supported; use one of {AFFINE_BITS}"
            )
        if self.group_size not in AFFINE_GROUP_SIZES:
            raise CpmkitError(
                f"MLX affine quantization: group_size={self.group_size} is not supported; "
                f"use one of {AFFINE_GROUP_SIZES}"
            )

    @property
    def mode(self) -> str:
        return "affine"

    @property
    def n_bins(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class AffineQuantized:
    """Unpacked result of :func:`quantize_affine`.

    codes:  uint8 ``[..., K]``, values in ``[0, 2**bits - 1]``
    scales: ``[..., K // group_size]`` in the input dtype (may be negative)
    biases: ``[..., K // group_size]`` in the input dtype
    """

    codes: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    spec: AffineSpec

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size


def check_quantizable(w: torch.Tensor, group_size: int, name: str) -> None:
    """What ``mx.quantize`` requires of its input, in any mode, as CpmkitErrors naming ``name``."""
    if w.dtype not in FLOAT_DTYPES:
        raise CpmkitError(f"{name}: dtype {w.dtype} cannot be MLX-quantized; use float32, float16 or bfloat16")
    if w.dim() < 2:
        raise CpmkitError(f"{name}: MLX quantization needs at least 2 dimensions, got shape {tuple(w.shape)}")
    if w.shape[-1] % group_size:
        raise CpmkitError(
            f"{name}: last dimension {w.shape[-1]} is not divisible by group_size {group_size}; "
            "keep this tensor in float"
        )


def _choose_scales(
    w_min: torch.Tensor, w_max: torch.Tensor, spec: AffineSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 group minima and maxima ``(n_groups,)`` -> float32 scales and biases ``(n_groups,)``.

    Mirrors quantize<T, U> in mlx/backend/cpu/quantized.cpp step by step; every operation is a
    single float32 operation there too, and torch.round is round-half-to-even like std::rint.
    """
    min_is_edge = w_min.abs() > w_max.abs()
    scale = (w_max - w_min).div_(spec.n_bins).clamp_min_(SCALE_EPS)
    scale = torch.where(min_is_edge, scale, scale.neg())
    edge = torch.where(min_is_edge, w_min, w_max)
    q0 = edge / scale
    for piece in q0.split(ROUND_GRAIN_SIZE):
        piece.round_()
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / q0, scale)
    bias = torch.where(nonzero, edge, 0.0)
    return scale, bias


def quantize_affine(w: torch.Tensor, bits: int, group_size: int, name: str = "tensor") -> AffineQuantized:
    """Quantize ``w [..., K]`` (float32/float16/bfloat16) the way ``mx.quantize(w, group_size, bits)``
    does on CPU: same codes, and scales/biases equal bit for bit in ``w``'s dtype.

    Raises CpmkitError (naming ``name``) for unsupported bits/group_size, dtype, or K not divisible
    by group_size.
    """
    spec = AffineSpec(bits=bits, group_size=group_size)
    check_quantizable(w, group_size, name)
    groups = w.reshape(-1, group_size)  # (n_groups, group_size): groups never straddle rows
    n_groups = groups.shape[0]
    codes = torch.empty((n_groups, group_size), dtype=torch.uint8)
    scales = torch.empty(n_groups, dtype=w.dtype)
    biases = torch.empty(n_groups, dtype=w.dtype)
    step = max(1, (TORCH_GRAIN_SIZE - 1) // group_size)  # groups per step
    chunk = step * max(1, min(TORCH_GRAIN_SIZE - 1, CHUNK_ELEMENTS // group_size) // step)  # groups per chunk
    work = torch.empty((min(chunk, n_groups), group_size), dtype=torch.float32)
    w_min = torch.empty(len(work), dtype=torch.float32)
    w_max = torch.empty_like(w_min)
    for start in range(0, n_groups, chunk):
        n = min(chunk, n_groups - start)
        blocks = work[:n].split(step)
        for block, source, lo, hi in zip(blocks, groups[start : start + n].split(step), w_min[:n].split(step),
                                         w_max[:n].split(step)):
            block.copy_(source)
            torch.amin(block, dim=1, out=lo)
            torch.amax(block, dim=1, out=hi)
        scale, bias = _choose_scales(w_min[:n], w_max[:n], spec)
        for block, s, b, dst in zip(blocks, scale[:, None].split(step), bias[:, None].split(step),
                                    codes[start : start + n].split(step)):
            # min(max(rint((w - bias) / scale), 0), n_bins) as in quantize<T, U>: clamping before rounding
            # gives the same integer, as both bounds are integers.
            block.sub_(b).div_(s).clamp_(0, spec.n_bins).add_(ROUND_MAGIC)
            dst.copy_(block.view(torch.int32))  # int32 -> uint8 keeps the low byte: the code
        # Cast once, from the final float32 values, as mlx's static_cast<T> does.
        scales[start : start + n].copy_(scale)
        biases[start : start + n].copy_(bias)
    lead, k = tuple(w.shape[:-1]), w.shape[-1]
    return AffineQuantized(
        codes=codes.reshape(*lead, k),
        scales=scales.reshape(*lead, k // group_size),
        biases=biases.reshape(*lead, k // group_size),
        spec=spec,
    )


def dequantize_affine(q: AffineQuantized) -> torch.Tensor:
    """``code * scale + bias`` in the scales' dtype, rounding after the multiply and after the add,
    as mlx's CPU ``affine_dequantize`` fallback does; equal to ``mx.dequantize`` bit for bit."""
    gs = q.group_size
    lead, k = tuple(q.codes.shape[:-1]), q.codes.shape[-1]
    groups_per_row = k // gs
    if tuple(q.scales.shape) != (*lead, groups_per_row) or q.biases.shape != q.scales.shape:
        raise CpmkitError(
            f"MLX affine dequantize: scales {tuple(q.scales.shape)} / biases {tuple(q.biases.shape)} "
            f"do not fit codes {tuple(q.codes.shape)} with group_size {gs}"
        )
    out = q.codes.reshape(*lead, groups_per_row, gs).to(q.scales.dtype)  # (..., G, gs)
    out.mul_(q.scales.unsqueeze(-1)).add_(q.biases.unsqueeze(-1))
    return out.reshape(*lead, k)
