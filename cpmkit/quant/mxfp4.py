"""MLX ``mxfp4`` quantization: E2M1 codes with one E8M0 (power-of-two) scale per 32 elements,
bit-exact with ``mx.quantize(w, mode="mxfp4")`` of mlx 0.32.4 on CPU.

The scale is ``2**e`` with ``e = ceil(log2(max|w| / 6))``: mlx PR #4353 (after v0.32.1) changed the
CPU and Metal rounding of E8M0 scales from nearest to up, matching CUDA, so the group maximum never
clips. ``max|w| / 6`` is computed in the input dtype, as in ``fp_quantize`` (mlx/ops.cpp). Each
element then becomes the E2M1 code whose value is nearest to ``w / 2**e`` (also computed in the input
dtype), ties going to the lower code index, as the fallback's ``argmin`` over the value table does.
The codes are packed like 4-bit affine codes (``formats/mlx/pack.py``).

One deliberate difference: a non-zero group whose scale would need ``e < -127`` (max |w| below about
1e-38) is stored as a zero group; mlx writes a wrapped-around uint8 exponent there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpmkit.errors import CpmkitError
from cpmkit.quant.affine import check_quantizable

MXFP4_GROUP_SIZE = 32
MXFP4_BITS = 4
E8M0_BIAS = 127
E8M0_MIN_EXPONENT = -127  # uint8 0
E2M1_MAX = 6.0
# E2M1 value of each 4-bit code: bit 3 is the sign (FP4_LUT in mlx/backend/cpu/quantized.cpp).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Groups per chunk while quantizing: the (groups, 32, 16) distance table stays near 64 MiB in float32.
CHUNK_GROUPS = 1 << 15


@dataclass(frozen=True)
class Mxfp4Quantized:
    """Unpacked result of :func:`quantize_mxfp4`.

    codes:  uint8 ``[..., K]``, E2M1 code indices in ``[0, 15]``
    scales: uint8 ``[..., K // 32]``, E8M0 biased exponents (value ``2**(s - 127)``)
    """

    codes: torch.Tensor
    scales: torch.Tensor

    bits = MXFP4_BITS
    group_size = MXFP4_GROUP_SIZE
    mode = "mxfp4"


def _scale_exponents(groups: torch.Tensor) -> torch.Tensor:
    """groups ``(G, 32)`` in the input dtype -> int32 ``e`` per group, ``2**e >= max|w| / 6``."""
    target = groups.abs().amax(dim=-1) / torch.tensor(E2M1_MAX, dtype=groups.dtype)  # rounded to dtype
    mantissa, exponent = torch.frexp(target.float())  # target = mantissa * 2**exponent, mantissa in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact ceil(log2(target))
    # Zero groups get 2**0, as in mlx; groups too small for E8M0 are flushed to zero (see module doc).
    return torch.where((target == 0) | (e < E8M0_MIN_EXPONENT), torch.zeros_like(e), e)


def _nearest_codes(groups: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    dtype = groups.dtype
    scaled = groups / torch.ldexp(torch.ones_like(e, dtype=torch.float32), e).to(dtype)[:, None]  # (G, 32)
    table = torch.tensor(E2M1_VALUES, dtype=dtype)
    # torch.argmin returns the first of equal minima, like mlx's argmin.
    return (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8)  # (G, 32)


def quantize_mxfp4(w: torch.Tensor, name: str = "tensor") -> Mxfp4Quantized:
    """Quantize ``w [..., K]`` (float32/float16/bfloat16, K a multiple of 32) as mlx's mxfp4 mode."""
    check_quantizable(w, MXFP4_GROUP_SIZE, name)
    k = w.shape[-1]
    groups = w.detach().to("cpu").reshape(-1, MXFP4_GROUP_SIZE)  # (G, 32)
    codes = torch.empty(groups.shape, dtype=torch.uint8)
    scales = torch.empty(groups.shape[0], dtype=torch.uint8)
    for start in range(0, groups.shape[0], CHUNK_GROUPS):
        chunk = groups[start : start + CHUNK_GROUPS]
        e = _scale_exponents(chunk)
        codes[start : start + CHUNK_GROUPS] = _nearest_codes(chunk, e)
        scales[start : start + CHUNK_GROUPS] = (e + E8M0_BIAS).to(torch.uint8)
    lead = tuple(w.shape[:-1])
    return Mxfp4Quantized(codes=codes.reshape(*lead, k), scales=scales.reshape(*lead, k // MXFP4_GROUP_SIZE))


def dequantize_mxfp4(q: Mxfp4Quantized, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``E2M1[code] * 2**(scale - 127)`` in ``dtype`` (bfloat16 by default, as ``mx.dequantize``);
    equal to ``mx.dequantize(..., mode="mxfp4", dtype=dtype)`` bit for bit."""
    lead, k = tuple(q.codes.shape[:-1]), q.codes.shape[-1]
    if tuple(q.scales.shape) != (*lead, k // MXFP4_GROUP_SIZE):
        raise CpmkitError(
            f"MLX mxfp4 dequantize: scales {tuple(q.scales.shape)} do not fit codes {tuple(q.codes.shape)}"
        )
    values = torch.tensor(E2M1_VALUES, dtype=dtype)[q.codes.long()]  # (..., K)
    exponents = q.scales.to(torch.int32) - E8M0_BIAS
    powers = torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents).to(dtype)  # (..., G)
    out = values.reshape(*lead, k // MXFP4_GROUP_SIZE, MXFP4_GROUP_SIZE) * powers.unsqueeze(-1)
    return out.reshape(*lead, k)
