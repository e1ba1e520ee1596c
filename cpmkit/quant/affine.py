"""MLX affine quantization: per-group scale and bias, bit-exact with ``mx.quantize`` on CPU.

Each row of ``w [..., K]`` is cut into groups of ``group_size`` consecutive elements; a group stores
``codes`` in ``[0, 2**bits - 1]`` and one ``scale`` and ``bias`` in the input dtype, and decodes as
``code * scale + bias``. The choice of scale and bias follows mlx's CPU kernel
(``quantize<T, U>`` in ``mlx/backend/cpu/quantized.cpp``), which is not plain min/max: the extreme
with the larger magnitude becomes the bias (code 0) and the scale is nudged so that 0.0 decodes exactly.
Packing the codes into uint32 words is a byte layout and lives in ``cpmkit.formats.mlx_pack``.
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
# Elements per row chunk while quantizing: bounds the float32 temporaries to a few tens of MiB.
CHUNK_ELEMENTS = 1 << 22


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


def _quantize_groups(
    groups: torch.Tensor, spec: AffineSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 groups ``(n_groups, group_size)`` -> uint8 codes, float32 scales and biases ``(n_groups,)``.

    Mirrors quantize<T, U> in mlx/backend/cpu/quantized.cpp step by step; every operation is a
    single float32 operation there too, and torch.round is round-half-to-even like std::rint.
    """
    n_bins = torch.tensor(float(spec.n_bins), dtype=torch.float32)
    w_max = groups.amax(dim=-1)
    w_min = groups.amin(dim=-1)
    min_is_edge = w_min.abs() > w_max.abs()
    scale = torch.maximum((w_max - w_min) / n_bins, torch.tensor(SCALE_EPS, dtype=torch.float32))
    scale = torch.where(min_is_edge, scale, -scale)
    edge = torch.where(min_is_edge, w_min, w_max)
    q0 = torch.round(edge / scale)
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / q0, scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    codes = torch.round((groups - bias[:, None]) / scale[:, None]).clamp_(0, spec.n_bins)
    return codes.to(torch.uint8), scale, bias


def quantize_affine(w: torch.Tensor, bits: int, group_size: int, name: str = "tensor") -> AffineQuantized:
    """Quantize ``w [..., K]`` (float32/float16/bfloat16) the way ``mx.quantize(w, group_size, bits)``
    does on CPU: same codes, and scales/biases equal bit for bit in ``w``'s dtype.

    Raises CpmkitError (naming ``name``) for unsupported bits/group_size, dtype, or K not divisible
    by group_size.
    """
    spec = AffineSpec(bits=bits, group_size=group_size)
    check_quantizable(w, group_size, name)
    k = w.shape[-1]
    rows = w.reshape(-1, k)  # (R, K)
    n_rows, groups_per_row = rows.shape[0], k // group_size
    codes = torch.empty((n_rows, k), dtype=torch.uint8)
    scales = torch.empty((n_rows, groups_per_row), dtype=w.dtype)
    biases = torch.empty((n_rows, groups_per_row), dtype=w.dtype)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, n_rows, step):
        chunk = rows[start : start + step].to(device="cpu", dtype=torch.float32)
        n = chunk.shape[0]
        q, s, b = _quantize_groups(chunk.reshape(n * groups_per_row, group_size), spec)
        codes[start : start + n] = q.reshape(n, k)
        # Cast once, from the final float32 values, as mlx's static_cast<T> does.
        scales[start : start + n] = s.reshape(n, groups_per_row).to(w.dtype)
        biases[start : start + n] = b.reshape(n, groups_per_row).to(w.dtype)
    lead = tuple(w.shape[:-1])
    return AffineQuantized(
        codes=codes.reshape(*lead, k),
        scales=scales.reshape(*lead, groups_per_row),
        biases=biases.reshape(*lead, groups_per_row),
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
