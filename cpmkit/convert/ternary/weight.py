"""A ternary-pack linear as a ``cpmkit.kernels.QuantLinear`` weight: the stored ``weight_packed`` and
``weight_scale`` decoded by ``cpmkit.formats.ternary`` on the torch path, repacked for Triton into the kernels'
affine layout as 2-bit codes with the constant zero 1 and the scale per group, or per output channel applied
after the K sum (a ``channel`` layout: no scale is read inside the K loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats import bitnet, ternary
from cpmkit.kernels.layout import (
    AffineCodes,
    AffineLayout,
    PackedWeight,
    pack_affine,
    rows_per_chunk,
    scale_block,
)

BUFFERS = ("weight_packed", "weight_scale")


def _check_stored(name: str, what: str, codes_key: str, codes: torch.Tensor, codes_shape: tuple[int, ...],
                  scale: torch.Tensor, scale_shape: tuple[int, ...]) -> None:
    """One CpmkitError line when the stored codes (uint8) or ``weight_scale`` (a float) do not have the shape or
    dtype of ``what``."""
    for key, tensor, shape in ((codes_key, codes, codes_shape), ("weight_scale", scale, scale_shape)):
        if tuple(tensor.shape) != shape:
            raise CpmkitError(f"{name}: {key} has shape {list(tensor.shape)}, but {what} needs {list(shape)}")
    if codes.dtype != torch.uint8 or not scale.dtype.is_floating_point:
        raise CpmkitError(f"{name}: {codes_key} must be uint8 and weight_scale a float (got {codes.dtype} and "
                          f"{scale.dtype})")


@dataclass(frozen=True)
class TernaryPackWeight:
    shape: tuple[int, int]  # (N, K)
    group_size: int  # -1: one scale per row
    buffer_names: tuple[str, ...] = BUFFERS

    @property
    def label(self) -> str:
        return f"ternary-g{self.group_size if self.group_size > 0 else 'ch'}"

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.shape[1] // self.group_size

    def check(self, packed: torch.Tensor, scale: torch.Tensor, name: str) -> None:
        n, k = self.shape
        if k % ternary.CODES_PER_BYTE or (self.group_size != -1 and k % self.group_size):
            raise CpmkitError(f"{name}: {k} input features do not split into groups of {self.group_size} and "
                              f"bytes of {ternary.CODES_PER_BYTE} codes")
        _check_stored(name, f"a ternary {n}x{k} weight with group size {self.group_size}", "weight_packed", packed,
                      (n, k // ternary.CODES_PER_BYTE), scale, (n, self.groups))

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ternary.dequantize(packed, scale).float()

    def dequantize_rows(self, packed: torch.Tensor, scale: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.dequantize(packed[start:stop], scale[start:stop])

    def pack(self, packed: torch.Tensor, scale: torch.Tensor, name: str) -> PackedWeight:
        n, k = self.shape
        channel = self.group_size == -1
        block = scale_block(self.group_size, k)
        lay = AffineLayout(lo_bits=2, hi_bits=0, zero=1, block=block, sub_block=block, has_m=False, channel=channel)

        def chunks() -> Iterator[tuple[int, AffineCodes]]:
            step = rows_per_chunk(k)
            for n0 in range(0, n, step):
                rows = slice(n0, n0 + step)
                yield n0, AffineCodes(layout=lay, codes=ternary.unpack_codes(packed[rows]), d=scale[rows], m=None,
                                      sub_d=None, sub_m=None)

        return pack_affine(chunks(), lay, n, k)

    def describe(self) -> str:
        return f"ternary 2-bit, scale per {'row' if self.group_size == -1 else f'{self.group_size} weights'}"


@dataclass(frozen=True)
class BitNetWeight:
    """A linear in transformers' BitNet layout (``cpmkit.formats.bitnet``): ``weight`` uint8 ``[ceil(N/4), K]``
    in bands of rows and one ``weight_scale``; for the kernels, 2-bit codes with the scale per output channel."""

    shape: tuple[int, int]  # (N, K)
    linear_class: str = "autobitlinear"
    buffer_names: tuple[str, ...] = ("weight", "weight_scale")

    @property
    def label(self) -> str:
        return "bitnet"

    def check(self, packed: torch.Tensor, scale: torch.Tensor, name: str) -> None:
        n, k = self.shape
        _check_stored(name, f"a BitNet {n}x{k} weight", "weight", packed, (-(-n // bitnet.BANDS), k), scale, (1,))

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return bitnet.dequantize(packed, scale, self.shape[0], self.linear_class)

    def dequantize_rows(self, packed: torch.Tensor, scale: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return bitnet.dequantize(packed, scale, self.shape[0], self.linear_class, rows=(start, stop))

    def pack(self, packed: torch.Tensor, scale: torch.Tensor, name: str) -> PackedWeight:
        n, k = self.shape
        s = scale.float() if self.linear_class == "autobitlinear" else 1 / scale.float()
        lay = AffineLayout(lo_bits=2, hi_bits=0, zero=1, block=scale_block(-1, k), sub_block=scale_block(-1, k),
                           has_m=False, channel=True)
        codes = AffineCodes(layout=lay, codes=bitnet.unpack_rows(packed, n), d=s.expand(n, 1).contiguous(), m=None,
                            sub_d=None, sub_m=None)
        return pack_affine([(0, codes)], lay, n, k)

    def describe(self) -> str:
        return f"BitNet ternary ({self.linear_class}), one scale per tensor"
