"""A GPTQ or compressed-tensors ``pack-quantized`` linear as a ``cpmkit.kernels.QuantLinear`` weight: its
tensors as stored, decoded with ``cpmkit.formats.gptq.pack`` (``W = scale[g] * (q - zero[g])``, ``g =
g_idx[k]``) on the torch path and repacked into the kernels' affine layout for Triton.

For the kernels, a constant zero point (every symmetric checkpoint: ``2**(bits-1)``) stays the layout's
constant; per-group zeros become the additive term ``-zero * scale``. Act-order weights (``g_idx`` not
``k // group``) are sorted by group once at load, and the input features are gathered in the same order at
every call (``PackedWeight.perm``, as vLLM's Marlin path sorts them). A per-channel scale (group -1) is
a ``channel`` layout: applied once after the K sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats.gptq.pack import unpack_qweight, unpack_qzeros, unpack_rows
from cpmkit.kernels import QuantLinear
from cpmkit.kernels.layout import (
    AffineCodes,
    AffineLayout,
    PackedWeight,
    pack_affine,
    rows_per_chunk,
    scale_block,
)

PLANES = {2: (2, 0), 3: (2, 1), 4: (4, 0), 8: (8, 0)}
GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")
CT_BUFFERS = ("weight_packed", "weight_scale", "weight_shape")
CT_ZERO = "weight_zero_point"


@dataclass(frozen=True)
class GPTQWeight:
    """``layout``: "gptq" (qweight/qzeros/scales/g_idx; ``v1``: zeros stored minus 1) or "compressed-tensors"
    (weight_packed/weight_scale/weight_shape, and weight_zero_point when ``asym``)."""

    bits: int
    group_size: int  # -1: one group per row
    shape: tuple[int, int]  # (N, K)
    layout: str = "gptq"
    v1: bool = True
    asym: bool = False

    @property
    def buffer_names(self) -> tuple[str, ...]:
        if self.layout == "gptq":
            return GPTQ_BUFFERS
        return CT_BUFFERS + ((CT_ZERO,) if self.asym else ())

    @property
    def label(self) -> str:
        return f"gptq{self.bits}g{self.group_size if self.group_size > 0 else 'ch'}"

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.shape[1] // self.group_size

    # ---- decoding ----------------------------------------------------------------------------------------

    def codes(self, *buffers: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, K]``."""
        n, k = self.shape
        if self.layout == "gptq":
            return unpack_qweight(buffers[0], self.bits, k)
        return unpack_rows(buffers[0].T.contiguous(), self.bits, k).T

    def scales(self, *buffers: torch.Tensor) -> torch.Tensor:
        """``[N, groups]`` in the stored dtype."""
        return buffers[2].T if self.layout == "gptq" else buffers[1]

    def zeros(self, *buffers: torch.Tensor) -> torch.Tensor:
        """int16 ``[N, groups]``: the true zero points."""
        n, _ = self.shape
        if self.layout == "gptq":
            return unpack_qzeros(buffers[1], self.bits, n, self.v1)
        if not self.asym:
            return torch.full((n, self.groups), 1 << (self.bits - 1), dtype=torch.int16)
        return unpack_rows(buffers[3], self.bits, n).to(torch.int16)

    def g_idx(self, *buffers: torch.Tensor) -> torch.Tensor:
        k = self.shape[1]
        if self.layout == "gptq":
            return buffers[3].long()
        return torch.arange(k) // (k if self.group_size == -1 else self.group_size)

    def check(self, *buffers_then_name) -> None:
        *buffers, name = buffers_then_name
        n, k = self.shape
        if self.group_size != -1 and (self.group_size < 1 or k % self.group_size):
            raise CpmkitError(f"{name}: group size {self.group_size} does not divide its {k} input features; "
                              "cpmkit, vLLM and the Marlin kernels need whole groups")
        pf = k * self.bits // 32
        if self.layout == "gptq":
            expected = {"qweight": (pf, n), "qzeros": (self.groups, n * self.bits // 32), "scales": (self.groups, n),
                        "g_idx": (k,)}
        else:
            expected = {"weight_packed": (n, pf), "weight_scale": (n, self.groups), "weight_shape": (2,)}
            if self.asym:
                expected[CT_ZERO] = (n * self.bits // 32, self.groups)
        for (key, shape), tensor in zip(expected.items(), buffers):
            if tuple(tensor.shape) != shape:
                raise CpmkitError(f"{name}: {key} has shape {list(tensor.shape)}, but a {self.bits}-bit "
                                  f"{n}x{k} weight in groups of {self.group_size} needs {list(shape)}")
        if self.bits not in PLANES or k % 32 or n % 32:
            raise CpmkitError(f"{name}: {self.bits}-bit {n}x{k}: cpmkit reads 2/3/4/8 bits with both dimensions "
                              "multiples of 32")

    def dequantize(self, *buffers: torch.Tensor) -> torch.Tensor:
        g = self.g_idx(*buffers)
        scales, zeros = self.scales(*buffers).float(), self.zeros(*buffers).float()
        return scales[:, g] * (self.codes(*buffers).float() - zeros[:, g])

    def dequantize_rows(self, *buffers_then_range) -> torch.Tensor:
        *buffers, start, stop = buffers_then_range
        return self.dequantize(*buffers)[start:stop]

    # ---- the kernel layout -------------------------------------------------------------------------------

    def pack(self, *buffers_then_name) -> PackedWeight:
        *buffers, name = buffers_then_name
        n, k = self.shape
        g_idx = self.g_idx(*buffers)
        size = k if self.group_size == -1 else self.group_size
        perm = None
        if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // size):  # act-order: sort by group
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // size):
                raise CpmkitError(f"{name}: g_idx does not put {size} features in every group; cpmkit's kernels "
                                  "cannot run it (the torch path can)")
        block = scale_block(self.group_size, k)
        zeros = self.zeros(*buffers)
        constant = int(zeros.flatten()[0])
        uniform = bool((zeros == constant).all())
        lo, hi = PLANES[self.bits]
        lay = AffineLayout(lo_bits=lo, hi_bits=hi, zero=constant if uniform else 0, block=block, sub_block=block,
                           has_m=not uniform, channel=self.group_size == -1)
        codes_all, scales = self.codes(*buffers), self.scales(*buffers)

        def chunks() -> Iterator[tuple[int, AffineCodes]]:
            step = rows_per_chunk(k)
            for n0 in range(0, n, step):
                rows = slice(n0, n0 + step)
                codes = codes_all[rows] if perm is None else codes_all[rows][:, perm]
                m = None if uniform else -zeros[rows].float() * scales[rows].float()
                yield n0, AffineCodes(layout=lay, codes=codes.contiguous(), d=scales[rows].contiguous(), m=m,
                                      sub_d=None, sub_m=None)

        return pack_affine(chunks(), lay, n, k, perm=perm)

    def describe(self) -> str:
        return f"{self.layout} {self.bits}-bit group {self.group_size}"


def gptq_linear(buffers: dict[str, torch.Tensor], fmt: GPTQWeight, **options) -> QuantLinear:
    """A QuantLinear over one GPTQ / compressed-tensors linear's stored tensors; ``options``: QuantLinear's."""
    return QuantLinear(fmt, buffers, **options)
