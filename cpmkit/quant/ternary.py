"""Detect BitCPM-style ternary weights: every value is s x {-1, 0, +1}, with one s per scale group.

BitCPM4 stores its ternary weights fake-quantized in BF16, so nothing in the config says so; the values
do. A tensor is ternary at a granularity when, inside every group, all non-zero magnitudes are equal
(within bf16 rounding). Granularities go from coarse to fine, each coarser one implying the finer ones,
so the first that holds is the tensor's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from cpmkit.quant.groups import GroupQuantized, GroupSpec

# |w| values inside a group count as equal within this relative tolerance (bf16 keeps 8 mantissa bits)
MAGNITUDE_RTOL = 2.0**-8


class TernaryGranularity(str, Enum):
    TENSOR = "tensor"
    ROW = "row"
    GROUP128 = "group128"
    GROUP64 = "group64"
    GROUP32 = "group32"

    @property
    def group_size(self) -> int | None:
        """Scale group length along the row, or None for per-tensor / per-row scales."""
        return int(self.value.removeprefix("group")) if self.value.startswith("group") else None


_ORDER = list(TernaryGranularity)


@dataclass(frozen=True)
class TernaryReport:
    granularity: TernaryGranularity
    zero_fraction: float


def detect_ternary(weight: torch.Tensor) -> TernaryReport | None:
    """The coarsest granularity at which ``weight`` [rows, cols] is ternary, or None if it is not."""
    w = weight.detach().float().abs()
    if w.dim() != 2:
        return None
    rows, cols = w.shape
    for granularity in _ORDER:
        if granularity is TernaryGranularity.TENSOR:
            groups = w.reshape(1, -1)
        elif granularity is TernaryGranularity.ROW:
            groups = w
        elif cols % granularity.group_size == 0:
            groups = w.reshape(-1, granularity.group_size)  # (rows * cols / g, g)
        else:
            continue
        if _single_magnitude(groups):
            return TernaryReport(granularity, float((w == 0).float().mean()))
    return None


def _single_magnitude(groups: torch.Tensor) -> bool:
    top = groups.amax(dim=1)
    smallest = torch.where(groups > 0, groups, torch.full_like(groups, float("inf"))).amin(dim=1)
    nonzero = top > 0
    return bool(((top - smallest)[nonzero] <= MAGNITUDE_RTOL * top[nonzero]).all())


def coarsest_common(reports: list[TernaryReport]) -> TernaryGranularity:
    """The granularity every tensor satisfies: the finest among their own (finer ones contain coarser)."""
    return max((r.granularity for r in reports), key=_ORDER.index)


@dataclass(frozen=True)
class TernaryWeight:
    """A linear as ternary codes and scales: ``W = (codes - 1) * scales[:, k // group]``."""

    codes: torch.Tensor  # uint8 [N, K], t + 1
    scales: torch.Tensor  # [N, K / group], the weight's float dtype

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]


def _grouped(weight: torch.Tensor, group: int | None) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.reshape(rows, 1, cols) if group is None else weight.reshape(rows, cols // group, group)


def exact_ternary(weight: torch.Tensor, group: int | None) -> TernaryWeight | None:
    """``weight`` [N, K] as codes and one scale per row (``group`` None) or per ``group`` weights, such that
    ``(codes - 1) * scale`` gives every value back bit for bit in the weight's dtype (signed zeros aside); None
    when it does not (magnitudes differing inside a group, even by a rounding step)."""
    if weight.shape[0] > 1 and exact_ternary(weight[:1], group) is None:
        return None  # the first row settles it for ordinary weights, which every converter asks about
    w = _grouped(weight, group)
    scales = w.abs().amax(dim=2)  # [N, G], the stored dtype: one of the magnitudes itself
    trits = torch.sign(w).to(torch.int8)
    if not torch.equal(trits.to(w.dtype) * scales[..., None], w):
        return None
    return TernaryWeight((trits + 1).to(torch.uint8).reshape(weight.shape), scales.contiguous())


ABSMEAN_EPS = 1e-5


def absmean_ternary(weight: torch.Tensor, group: int | None) -> TernaryWeight:
    """BitNet b1.58's rule per row (``group`` None) or per ``group`` weights: ``s = max(mean|W|, 1e-5)``,
    ``t = clamp(round(W / s), -1, 1)``, with ``s`` rounded to the weight's dtype first, so the stored pair is
    what the rounding saw."""
    w = _grouped(weight, group).float()
    scales = w.abs().mean(dim=2).clamp_min(ABSMEAN_EPS).to(weight.dtype)
    trits = (w / scales.float()[..., None]).round().clamp(-1, 1).to(torch.int8)
    return TernaryWeight((trits + 1).to(torch.uint8).reshape(weight.shape), scales.contiguous())


def ternary_as_groups(weight: torch.Tensor, spec: GroupSpec) -> GroupQuantized | None:
    """``weight`` [N, K] on ``spec``'s grid with no error, when it is ternary with one scale per group of
    ``spec`` (or coarser): codes ``t + zero`` with the scale as the step, zero ``2**(bits-1)`` when symmetric and
    1 otherwise. None when it is not ternary so, or a scale is not exact in ``spec.scale_dtype``."""
    k = weight.shape[1]
    group = spec.group(k)
    exact = exact_ternary(weight, group)
    if exact is None:
        return None
    zero = 1 << (spec.bits - 1) if spec.sym else 1
    codes = exact.codes.to(torch.int16) + (zero - 1)
    groups = exact.scales.shape[1]
    q = GroupQuantized(spec, codes.to(torch.uint8), exact.scales.to(spec.scale_dtype),
                       torch.full((weight.shape[0], groups), zero, dtype=torch.uint8),
                       (torch.arange(k) // group).to(torch.int32))
    return q if torch.equal(q.dequantize(), weight.float()) else None
