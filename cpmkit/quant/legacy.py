"""Quantizers for ggml's plain types: F32, F16, BF16 and the 32-element blocks Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, bit-exact with ggml.c / ggml-quants.c.

Signature as in ``kquants``: float32 numpy rows ``(rows, n_per_row)`` and an optional per-column
importance vector -> ``QuantizedBlocks`` in row-major block order. Without the vector the Q4/Q5 types follow
``quantize_row_*_ref``; with it ``quantize_row_*_impl`` (Q8_0 and the float types ignore it, like ggml).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.quant.blocks import QuantizedBlocks
from cpmkit.quant.ggml_float import (
    first_abs_max,
    first_min,
    lroundf,
    rdiv,
    sequential_sum,
    sqrt,
)
from cpmkit.quant.kquant_search import make_qkx_quants, make_qx_quants

QK = 32  # weights per block of the legacy types


def quantize_f32(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    return QuantizedBlocks(QType.F32, torch.from_numpy(x.reshape(-1, 1)))


def quantize_f16(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    return QuantizedBlocks(QType.F16, _half(x.reshape(-1, 1)))


def quantize_bf16(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    """ggml_compute_fp32_to_bf16: round to nearest even on the bits; NaN -> quiet NaN keeping its sign
    and top payload bits (torch's own cast differs on NaN payloads)."""
    u = x.reshape(-1, 1).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16  # uint32 arithmetic wraps like the C's
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = np.where(nan, (u >> 16) | 64, rounded).astype(np.uint16)
    return QuantizedBlocks(QType.BF16, torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16))


def _half(v: np.ndarray) -> torch.Tensor:
    """float32 -> the float16 ggml stores (GGML_FP32_TO_FP16 rounds to nearest even, like torch)."""
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).half()


def _blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, QK)


def _inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``"""
    return np.where(d != 0, rdiv(1.0, d), np.float32(0))


def _truncate(v: np.ndarray) -> np.ndarray:
    """C's float -> (u)int8_t conversion of a value known to be in range: truncation toward zero."""
    return v.astype(np.int32)


def _row_weights(x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    """quantize_row_q{4,5}_{0,1}_impl weights qw * sqrt(sigma2 + x²), sigma2 = Σx²/n_per_row over the
    whole row (a sequential sum over the row); returned position-major (32, n_blocks)."""
    rows, n_per_row = x.shape
    xt = np.ascontiguousarray(x.T)  # (n_per_row, rows)
    sigma2 = sequential_sum(xt * xt) / np.float32(n_per_row)  # (rows,)
    xs = _blocks(x).T  # (32, n_blocks)
    sigma2 = np.repeat(sigma2, n_per_row // QK)  # per block
    qw = np.broadcast_to(quant_weights.reshape(1, -1), (rows, n_per_row)).reshape(-1, QK).T
    return np.ascontiguousarray(qw * sqrt(sigma2 + xs * xs))


def quantize_q8_0(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    xb = _blocks(x)
    d = np.abs(xb).max(1) / np.float32(127)
    qs = lroundf(xb * _inverse_or_zero(d)[:, None]).astype(np.int8)  # C: y.qs[j] = roundf(x*id)
    return QuantizedBlocks(QType.Q8_0, torch.from_numpy(qs), d=_half(d))


def _symmetric_ref(qtype: QType, x: np.ndarray, half_range: int) -> QuantizedBlocks:
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -half_range (the signed peak maps to code 0),
    q = MIN(2*half_range - 1, (int8)(x/d + half_range + 0.5))."""
    xb = _blocks(x)
    _, peak = first_abs_max(np.ascontiguousarray(xb.T))
    d = peak / np.float32(-half_range)
    q = _truncate(xb * _inverse_or_zero(d)[:, None] + np.float32(half_range + 0.5)).clip(max=2 * half_range - 1)
    return QuantizedBlocks(qtype, torch.from_numpy(q.astype(np.uint8)), d=_half(d))


def _symmetric_impl(qtype: QType, x: np.ndarray, quant_weights: np.ndarray, half_range: int):
    """quantize_row_q4_0_impl / q5_0_impl: make_qx_quants(32, half_range, ...) under row weights."""
    d, L = make_qx_quants(np.ascontiguousarray(_blocks(x).T), half_range, _row_weights(x, quant_weights))
    return QuantizedBlocks(qtype, torch.from_numpy(np.ascontiguousarray(L.astype(np.uint8).T)), d=_half(d))


def _affine_ref(qtype: QType, x: np.ndarray, nmax: int) -> QuantizedBlocks:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/nmax, m = min, q = (int)((x - min)/d + 0.5)."""
    xb = _blocks(x)
    mn, mx = first_min(np.ascontiguousarray(xb.T)), xb.max(1)  # m = min is stored: keep the C's sign of a zero minimum
    d = (mx - mn) / np.float32(nmax)
    q = _truncate((xb - mn[:, None]) * _inverse_or_zero(d)[:, None] + np.float32(0.5)).clip(max=nmax)
    return QuantizedBlocks(qtype, torch.from_numpy(q.astype(np.uint8)), d=_half(d), m=_half(mn))


def _affine_impl(qtype: QType, x: np.ndarray, quant_weights: np.ndarray, nmax: int):
    """quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants(32, nmax, ..., -0.9, 0.05, 36)."""
    scale, the_min, L = make_qkx_quants(np.ascontiguousarray(_blocks(x).T), _row_weights(x, quant_weights), nmax,
                                        -0.9, 0.05, 36, use_mad=False)
    return QuantizedBlocks(qtype, torch.from_numpy(np.ascontiguousarray(L.astype(np.uint8).T)), d=_half(scale),
                           m=_half(-the_min))


def quantize_q4_0(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    if quant_weights is None:
        return _symmetric_ref(QType.Q4_0, x, 8)
    return _symmetric_impl(QType.Q4_0, x, quant_weights, 8)


def quantize_q5_0(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    if quant_weights is None:
        return _symmetric_ref(QType.Q5_0, x, 16)
    return _symmetric_impl(QType.Q5_0, x, quant_weights, 16)


def quantize_q4_1(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    if quant_weights is None:
        return _affine_ref(QType.Q4_1, x, 15)
    return _affine_impl(QType.Q4_1, x, quant_weights, 15)


def quantize_q5_1(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    if quant_weights is None:
        return _affine_ref(QType.Q5_1, x, 31)
    return _affine_impl(QType.Q5_1, x, quant_weights, 31)


QUANTIZERS = {
    QType.F32: quantize_f32,
    QType.F16: quantize_f16,
    QType.BF16: quantize_bf16,
    QType.Q8_0: quantize_q8_0,
    QType.Q4_0: quantize_q4_0,
    QType.Q4_1: quantize_q4_1,
    QType.Q5_0: quantize_q5_0,
    QType.Q5_1: quantize_q5_1,
}
