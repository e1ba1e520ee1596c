"""An MLX affine-quantized tensor as a ``cpmkit.kernels.QuantLinear`` weight: ``weight`` uint32 codes,
``scales`` and ``biases`` as stored, dequantized by the format's own reader (``cpmkit.formats.mlx.pack``
unpacks, ``cpmkit.quant.affine`` decodes) on the torch path and repacked into the kernels' affine layout
(``w = scale * q + bias``) for Triton."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats.mlx.pack import unpack_codes
from cpmkit.kernels import QuantLinear
from cpmkit.kernels.layout import (
    AffineCodes,
    AffineLayout,
    PackedWeight,
    pack_affine,
    rows_per_chunk,
)
from cpmkit.quant.affine import AffineQuantized, AffineSpec, dequantize_affine

# Code width -> (low plane, high plane): odd widths split like GGUF's (4 + 1, 4 + 2, 2 + 1).
PLANES = {2: (2, 0), 3: (2, 1), 4: (4, 0), 5: (4, 1), 6: (4, 2), 8: (8, 0)}


def mlx_layout(bits: int, group_size: int) -> AffineLayout:
    if bits not in PLANES:
        raise CpmkitError(f"MLX affine: bits={bits} has no cpmkit kernel; supported: {sorted(PLANES)}")
    lo, hi = PLANES[bits]
    return AffineLayout(lo_bits=lo, hi_bits=hi, zero=0, block=group_size, sub_block=group_size, has_m=True)


def pack_mlx(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
             name: str = "weight") -> PackedWeight:
    """MLX ``weight`` uint32 ``[N, K*bits/32]`` with ``scales``/``biases`` ``[N, K/group_size]`` -> PackedWeight."""
    lay = mlx_layout(bits, group_size)
    n = weight.shape[0]
    k = weight.shape[-1] * 32 // bits
    if weight.dim() != 2 or k % group_size or scales.shape != (n, k // group_size) or biases.shape != scales.shape:
        raise CpmkitError(f"{name}: MLX weight {tuple(weight.shape)}, scales {tuple(scales.shape)} and biases "
                          f"{tuple(biases.shape)} do not fit {bits}-bit codes in groups of {group_size}")

    def chunks() -> Iterator[tuple[int, AffineCodes]]:
        step = rows_per_chunk(k)
        for n0 in range(0, n, step):
            rows = slice(n0, n0 + step)
            codes = unpack_codes(weight[rows], bits, k).to(weight.device)  # unpack_codes returns CPU tensors
            yield n0, AffineCodes(layout=lay, codes=codes, d=scales[rows], m=biases[rows], sub_d=None, sub_m=None)

    return pack_affine(chunks(), lay, n, k)


@dataclass(frozen=True)
class MLXAffineWeight:
    """An MLX affine-quantized weight: buffers ``weight`` uint32 ``[N, K*bits/32]``, ``scales`` and
    ``biases`` ``[N, K/group_size]`` (float16/bfloat16/float32); ``w = scale * q + bias``."""

    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K)
    buffer_names = ("weight", "scales", "biases")

    @property
    def label(self) -> str:
        """The weight type in speed tables."""
        return f"mlx{self.bits}g{self.group_size}"

    def check(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, name: str) -> None:
        mlx_layout(self.bits, self.group_size)  # raises for widths without a kernel
        n, k = self.shape
        if (weight.dtype not in (torch.uint32, torch.int32) or k % self.group_size
                or tuple(weight.shape) != (n, k * self.bits // 32)
                or tuple(scales.shape) != (n, k // self.group_size) or biases.shape != scales.shape):
            raise CpmkitError(f"{name}: MLX weight {weight.dtype} {tuple(weight.shape)}, scales {tuple(scales.shape)}"
                              f", biases {tuple(biases.shape)} do not fit {self.bits}-bit group-{self.group_size} "
                              f"codes of an {n}x{k} weight")

    def dequantize(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        codes = unpack_codes(weight, self.bits, self.shape[1])
        # float32 scales and biases: the affine product is formed in float32, as MLX's matmul kernels do
        spec = AffineSpec(bits=self.bits, group_size=self.group_size)
        return dequantize_affine(AffineQuantized(codes, scales.float(), biases.float(), spec))

    def dequantize_rows(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, start: int,
                        stop: int) -> torch.Tensor:
        return self.dequantize(weight[start:stop], scales[start:stop], biases[start:stop])

    def pack(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, name: str) -> PackedWeight:
        return pack_mlx(weight, scales, biases, self.bits, self.group_size, name)

    def describe(self) -> str:
        return f"mlx affine {self.bits}-bit group {self.group_size}"


def mlx_linear(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
               bias: torch.Tensor | None = None, **options) -> QuantLinear:
    """A QuantLinear over an MLX layer's stored tensors; ``options``: QuantLinear's (backend, name, ...)."""
    shape = (weight.shape[0], weight.shape[-1] * 32 // bits)
    fmt = MLXAffineWeight(bits, group_size, shape)
    return QuantLinear(fmt, {"weight": weight, "scales": scales, "biases": biases}, bias, **options)
