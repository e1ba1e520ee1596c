"""Group-wise integer quantization of linear weights, the shared ground of GPTQ, AWQ and round-to-nearest.

A weight ``W [N, K]`` (N = out, K = in features) is stored as unsigned integer codes ``q`` of ``bits`` bits
and, per output row and group of input columns, a scale and an integer zero point:

    W[n, k] ~= scale[n, g_idx[k]] * (q[n, k] - zero[n, g_idx[k]])

The result, :class:`GroupQuantized`, is format-neutral: GPTQ, compressed-tensors, Marlin and AWQ layouts
all pack it (the formats package). Scales are rounded to the dtype the format stores them in before codes are
chosen, so the codes are exactly those the stored scale decodes best.

The scale and zero of a group follow the GPTQ quantizer (AutoGPTQ / GPTQModel ``Quantizer.find_params``):
the range always includes 0 (``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``); symmetric ranges are
``[-absmax, absmax]`` with zero ``2**(bits-1)``; a group of zeros gets the range [-1, 1];
``scale = (xmax - xmin) / (2**bits - 1)``; the asymmetric zero is ``round(-xmin / scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpmkit.errors import CpmkitError

GROUP_BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class GroupSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = True
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.bits not in GROUP_BITS:
            raise CpmkitError(f"bits={self.bits} is not supported; use one of {GROUP_BITS}")
        if self.group_size not in GROUP_SIZES:
            raise CpmkitError(f"group size {self.group_size} is not supported; use one of {GROUP_SIZES}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group(self, k: int) -> int:
        """Columns per group for a row of ``k`` (the whole row for group size -1)."""
        return k if self.group_size == -1 else self.group_size

    def check(self, shape: tuple[int, int], name: str) -> None:
        n, k = shape
        if k % self.group(k) or k % 32 or n % 32:
            raise CpmkitError(f"{name}: a {n}x{k} weight does not split into groups of {self.group(k)} (both "
                              "dimensions must be multiples of 32, K of the group size)")


@dataclass(frozen=True)
class GroupQuantized:
    """Codes uint8 ``[N, K]``; scales ``[N, groups]`` (the spec's scale dtype); zeros uint8 ``[N, groups]``;
    ``g_idx`` int32 ``[K]``: the group of each input column (``k // group`` unless act-order reordered them)."""

    spec: GroupSpec
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``."""
        g = self.g_idx.long()
        return self.scales.float()[:, g] * (self.codes.float() - self.zeros.float()[:, g])


def find_params(x: torch.Tensor, spec: GroupSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N] in the spec's dtype as float32, zero [N] float32 integer-valued) for the columns ``x``
    [N, cols] of one group."""
    x = x.float()
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / spec.maxq).to(spec.scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.finfo(spec.scale_dtype).tiny)  # a range below the dtype's reach
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (float32, integer-valued) of columns ``x`` [N, ...] with per-row ``scale``, ``zero`` [N]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.clamp(torch.round(x.float() / scale.view(shape)) + zero.view(shape), 0, maxq)


def round_to_nearest(w: torch.Tensor, spec: GroupSpec, name: str = "weight") -> GroupQuantized:
    """Each group's own min/max scale and zero, codes rounded to nearest: the baseline GPTQ and AWQ beat."""
    spec.check(tuple(w.shape), name)
    n, k = w.shape
    g = spec.group(k)
    groups = w.float().reshape(n, k // g, g).transpose(0, 1)  # [groups, N, g]
    params = [find_params(x, spec) for x in groups]
    scales = torch.stack([s for s, _ in params], dim=1)  # [N, groups]
    zeros = torch.stack([z for _, z in params], dim=1)
    codes = torch.cat([quantize_codes(x, s, z, spec.maxq) for x, (s, z) in zip(groups, params)], dim=1)
    return GroupQuantized(spec, codes.to(torch.uint8), scales.to(spec.scale_dtype), zeros.to(torch.uint8),
                          torch.arange(k, dtype=torch.int32) // g)
