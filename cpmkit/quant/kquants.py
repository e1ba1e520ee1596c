"""K-quant quantizers Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, bit-exact with ggml-quants.c.

Each ``quantize_qN_k(x, quant_weights)`` takes float32 numpy rows ``(rows, n_per_row)`` (n_per_row a
multiple of 256) and returns a ``QuantizedBlocks`` of rows*n_per_row/256 super-blocks in row-major order.
Without ``quant_weights`` it follows ``quantize_row_qN_K_ref`` (what llama-quantize runs without an
imatrix); with the per-column importance vector ``(n_per_row,)`` it follows ``quantize_row_qN_K_impl``.

Internally sub-blocks are position-major: ``(sub_size, n_sub_blocks)``, sub-block s = 8*b + j (or
16*b + j) for super-block b, so C's per-element loops are loops over rows of contiguous vectors.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.constants import QK_K

from cpmkit.quant.blocks import QuantizedBlocks
from cpmkit.quant.ggml_float import (
    GROUP_MAX_EPS,
    first_abs_max,
    nearest_int,
    nearest_int_clamped,
    rdiv,
    sequential_sum,
    sqrt,
)
from cpmkit.quant.kquant_search import (
    ZERO,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
)

SCALE_LEVELS = 63  # 6-bit sub-block scales / mins of Q3_K..Q5_K
Q2_SCALE_LEVELS = 15  # 4-bit sub-block scales / mins of Q2_K


def _position_major(t: np.ndarray, sub: int) -> np.ndarray:
    """(rows, n_per_row) -> (sub, n_sub_blocks): column s holds sub-block s."""
    return np.ascontiguousarray(t.reshape(-1, sub).T)


def _codes(L: np.ndarray) -> torch.Tensor:
    """Position-major float codes (sub, n_sub_blocks) -> uint8 (n_super_blocks, 256)."""
    return torch.from_numpy(np.ascontiguousarray(L.astype(np.uint8).T).reshape(-1, QK_K))


def _half(v: np.ndarray) -> torch.Tensor:
    """float32 -> the float16 ggml stores (GGML_FP32_TO_FP16 rounds to nearest even, like torch)."""
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).half()


def _uint8(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v).astype(np.uint8))


def _per_sub_block(v: np.ndarray, sub: int) -> np.ndarray:
    """(n_super_blocks,) -> (n_sub_blocks,): each super-block value repeated for its sub-blocks."""
    return np.repeat(v, QK_K // sub)


def _column_weights(quant_weights: np.ndarray, rows: int, sub: int) -> np.ndarray:
    """The imatrix vector repeated for every row, position-major like the data."""
    return _position_major(np.broadcast_to(quant_weights.reshape(1, -1), (rows, quant_weights.size)), sub)


def _imatrix_weights(x: np.ndarray, quant_weights: np.ndarray, sub: int, sigma_factor: int):
    """Element weights qw * sqrt(sigma2 + x²) of the K-quant _impl paths, sigma2 = factor*Σx²/256 per
    super-block; returns them position-major with x, and the per-sub-block weight sums."""
    x256 = _position_major(x, QK_K)  # (256, n_super_blocks)
    sigma2 = sequential_sum(x256 * x256) * sigma_factor / QK_K
    xs = _position_major(x, sub)
    weights = _column_weights(quant_weights, x.shape[0], sub) * sqrt(_per_sub_block(sigma2, sub) + xs * xs)
    return xs, weights, sequential_sum(weights)


def _requantize(xs: np.ndarray, L: np.ndarray, d: torch.Tensor, sc: np.ndarray, lo: int, hi: int,
                dmin: torch.Tensor | None = None, mn: np.ndarray | None = None) -> np.ndarray:
    """The final pass of every K-quant: codes from the *stored* (fp16) scales, q = clamp(nearest_int(
    (x + dmin*mn)/(d*sc)), lo, hi) - lo; sub-blocks whose d*sc is 0 keep the search's codes.
    ``sc``/``mn`` are (n_super, n_sub) integer-valued float32."""
    dj = (d.float().numpy()[:, None] * sc).reshape(-1)  # (n_sub_blocks,)
    keep = dj == 0
    v = xs if dmin is None else xs + (dmin.float().numpy()[:, None] * mn).reshape(-1)
    q = nearest_int_clamped(v / np.where(keep, np.float32(1), dj), lo, hi)
    q -= lo
    return np.where(keep, L, q) if keep.any() else q


def _max_positive(v: np.ndarray) -> np.ndarray:
    """``max = 0; if (v > max) max = v`` over each super-block's sub-blocks (-0.0 stays +0.0)."""
    vmax = v.max(1)
    return np.where(vmax > 0, vmax, ZERO)


def _scale_to_levels(v: np.ndarray, vmax: np.ndarray, levels: int) -> np.ndarray:
    """nearest_int(levels/vmax * v), 0 where vmax is not positive (the ref paths' scale quantization)."""
    inv = np.where(vmax > 0, rdiv(levels, vmax), ZERO)
    return nearest_int(inv[:, None] * v)


def _divide_positive(v: np.ndarray, levels: int) -> np.ndarray:
    """``v > 0 ? v/levels : 0`` (a scale that never became positive is stored as +0)."""
    return np.where(v > 0, v / np.float32(levels), ZERO)


def quantize_q2_k(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    if quant_weights is None:  # quantize_row_q2_K_ref
        xs = _position_major(x, 16)
        scales, mins, L = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        # C: scales[j] = l (no clamp), then scales[j] |= l_min << 4, both into one uint8
        packed = (_scale_to_levels(scales, max_scale, Q2_SCALE_LEVELS)
                  | (_scale_to_levels(mins, max_min, Q2_SCALE_LEVELS) << 4)) & 0xFF
        d, dmin = _half(_divide_positive(max_scale, Q2_SCALE_LEVELS)), _half(_divide_positive(max_min, Q2_SCALE_LEVELS))
    else:  # quantize_row_q2_K_impl (sigma2 without the factor 2 of the other _impl paths)
        xs, weights, sw = _imatrix_weights(x, quant_weights, 16, sigma_factor=1)
        scales, mins, L = make_qkx_quants(xs, weights, 3, -0.9, 0.05, 36, use_mad=False)
        sw = np.ascontiguousarray(sw.reshape(-1, 16).T)
        dm, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(-1, 16).T), Q2_SCALE_LEVELS, sw)
        mm, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(-1, 16).T), Q2_SCALE_LEVELS, sw)
        packed = (Ls.T.astype(np.int32) | (Lm.T.astype(np.int32) << 4)) & 0xFF
        d, dmin = _half(dm), _half(mm)
    sc, mn = packed & 0xF, packed >> 4
    L = _requantize(xs, L, d, sc.astype(np.float32), 0, 3, dmin, mn.astype(np.float32))
    return QuantizedBlocks(QType.Q2_K, _codes(L), d=d, dmin=dmin, scales=_uint8(sc), mins=_uint8(mn))


def quantize_q3_k(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    if quant_weights is None:  # quantize_row_q3_K_ref
        xs = _position_major(x, 16)
        scales, L = make_q3_quants(xs, 4)
        scales = scales.reshape(-1, 16)
        _, max_scale = first_abs_max(np.ascontiguousarray(scales.T))
        nonzero = max_scale != 0
        iscale = rdiv(-32, max_scale)
        l = nearest_int(iscale[:, None] * scales)
        l = ((l + 128) & 0xFF) - 128  # C stores nearest_int's result in an int8_t first
        levels = np.where(nonzero[:, None], l.clip(-32, 31) + 32, 0)
        d = _half(np.where(nonzero, rdiv(1.0, iscale), ZERO))
    else:  # quantize_row_q3_K_impl
        xs, weights, sw = _imatrix_weights(x, quant_weights, 16, sigma_factor=2)
        scales, L = make_qx_quants(xs, 4, weights)
        d_block, Ls = make_qx_quants(np.ascontiguousarray(scales.reshape(-1, 16).T), 32,
                                     np.ascontiguousarray(sw.reshape(-1, 16).T))
        levels, d = Ls.T.astype(np.int32), _half(d_block)
    L = _requantize(xs, L, d, (levels - 32).astype(np.float32), -4, 3)
    return QuantizedBlocks(QType.Q3_K, _codes(L), d=d, scales=_uint8(levels))


def _quantize_q45_k(qtype: QType, x: np.ndarray, quant_weights: np.ndarray | None, nmax: int,
                    ref_grid: tuple[float, float, int]) -> QuantizedBlocks:
    if quant_weights is None:  # quantize_row_q{4,5}_K_ref
        xs = _position_major(x, 32)
        av_x = sqrt(sequential_sum(xs * xs) / np.float32(32))
        weights = np.abs(xs)
        weights += av_x
        scales, mins, L = make_qkx_quants(xs, weights, nmax, *ref_grid, use_mad=False)
        scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        # C: uint8_t ls = nearest_int(...); ls = MIN(63, ls)
        ls = (_scale_to_levels(scales, max_scale, SCALE_LEVELS) & 0xFF).clip(max=SCALE_LEVELS)
        lm = (_scale_to_levels(mins, max_min, SCALE_LEVELS) & 0xFF).clip(max=SCALE_LEVELS)
        d, dmin = _half(max_scale / np.float32(SCALE_LEVELS)), _half(max_min / np.float32(SCALE_LEVELS))
    else:  # quantize_row_q{4,5}_K_impl
        xs, weights, sw = _imatrix_weights(x, quant_weights, 32, sigma_factor=2)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, -0.9, 0.05, 36, use_mad=False)
        sw = np.ascontiguousarray(sw.reshape(-1, 8).T)
        d_block, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(-1, 8).T), SCALE_LEVELS, sw)
        m_block, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(-1, 8).T), SCALE_LEVELS, sw)
        Ls, Lm = Ls.T.astype(np.int32), Lm.T.astype(np.int32)
        if qtype == QType.Q5_K:  # uint8_t ls = Ls[j]; ls = MIN(63, ls)
            ls, lm = Ls.clip(max=SCALE_LEVELS), Lm.clip(max=SCALE_LEVELS)
        else:  # Q4_K packs Ls/Lm unclamped (make_qp_quants can wrap a garbage code to > 63)
            ls, lm = _scale_min_k4_as_stored(Ls, Lm)
        d, dmin = _half(d_block), _half(m_block)
    L = _requantize(xs, L, d, ls.astype(np.float32), 0, nmax, dmin, lm.astype(np.float32))
    return QuantizedBlocks(qtype, _codes(L), d=d, dmin=dmin, scales=_uint8(ls), mins=_uint8(lm))


def _scale_min_k4_as_stored(ls: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit (scale, min) pairs get_scale_min_k4 reads back after quantize_row_q4_K_impl packed
    8-bit values: for j < 4 the whole byte is written and ORed with the top bits of j + 4, so stray
    bits 6-7 of a code > 63 land in sub-block j + 4's value. (n_super, 8) int32 each."""
    top_sc = ((ls[:, :4] >> 6) | (ls[:, 4:] >> 4)) & 3
    top_mn = ((lm[:, :4] >> 6) | (lm[:, 4:] >> 4)) & 3
    sc = np.concatenate([ls[:, :4] & 63, (ls[:, 4:] & 0xF) | (top_sc << 4)], axis=1)
    mn = np.concatenate([lm[:, :4] & 63, (lm[:, 4:] & 0xF) | (top_mn << 4)], axis=1)
    return sc, mn


def quantize_q4_k(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    return _quantize_q45_k(QType.Q4_K, x, quant_weights, 15, (-1.0, 0.1, 20))


def quantize_q5_k(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    return _quantize_q45_k(QType.Q5_K, x, quant_weights, 31, (-0.5, 0.1, 15))


def quantize_q6_k(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    """quantize_row_q6_K_ref / _impl: the _impl passes the raw imatrix values as make_qx_quants weights."""
    xs = _position_major(x, 16)
    qw = None if quant_weights is None else _column_weights(quant_weights, x.shape[0], 16)
    scales, L = make_qx_quants(xs, 32, qw)
    scales = scales.reshape(-1, 16)
    max_abs, max_scale = first_abs_max(np.ascontiguousarray(scales.T))
    zero = max_abs < GROUP_MAX_EPS  # the C memsets such a super-block to 0
    iscale = rdiv(-128, max_scale)
    sc = np.where(zero[:, None], 0, nearest_int(iscale[:, None] * scales).clip(max=127))
    d = _half(np.where(zero, ZERO, rdiv(1.0, iscale)))
    L = _requantize(xs, L, d, sc.astype(np.float32), -32, 31)
    L *= ~_per_sub_block(zero, 16)
    return QuantizedBlocks(QType.Q6_K, _codes(L), d=d, scales=torch.from_numpy(sc.astype(np.int8)))


QUANTIZERS = {
    QType.Q2_K: quantize_q2_k,
    QType.Q3_K: quantize_q3_k,
    QType.Q4_K: quantize_q4_k,
    QType.Q5_K: quantize_q5_k,
    QType.Q6_K: quantize_q6_k,
}
