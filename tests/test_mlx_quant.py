"""MLX affine quantization: bit-exact against mx.quantize / mx.dequantize on CPU, plus input errors."""

import numpy as np
import pytest
import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats.mlx.pack import pack_codes, unpack_codes
from cpmkit.quant.affine import (
    AFFINE_BITS,
    AFFINE_GROUP_SIZES,
    dequantize_affine,
    quantize_affine,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A few rows of MiniCPM matrices: in-dims of MiniCPM-1B (1536), MiniCPM-2B (2304), MiniCPM4-8B (4096).
ROW_SHAPES = ((8, 1536), (4, 2304), (6, 4096))
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(scope="module")
def mx():
    return pytest.importorskip("mlx.core")


def weight_rows(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows at a realistic weight scale, with the rows that stress each branch of mlx's
    scale choice written over the first ones (as many as the shape has room for)."""
    rows, k = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((max(rows, 7), k), generator=gen) * 0.02
    special = [
        torch.zeros(k),  # zero range: scale = -eps, q0 = 0, bias 0
        w[1].abs() + 0.01,  # all positive: edge is w_max, scale negative
        -(w[2].abs() + 0.01),  # all negative: edge is w_min, scale positive
        torch.where(torch.arange(k) == 37, torch.tensor(3.0), w[3]),  # one outlier in one group
        torch.round(w[4] * 400) / 100,  # coarse grid: exact ties for the rounding of codes
        torch.full((k,), 0.5),  # constant non-zero groups: range 0, scale clamped to eps
        w[6] * 1e-6,  # tiny values: eps clamp with q0 = 0 (f16 flushes them to zero)
    ]
    for i, row in enumerate(special):
        w[i] = row
    return w[:rows].to(dtype)


def to_mx(mx, t: torch.Tensor):
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw bits
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def from_mx(mx, a) -> torch.Tensor:
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_SAME_WIDTH_INT.get(t.dtype, torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_bit_exact_with_mx_quantize(mx, bits, group_size, dtype):
    for seed, shape in enumerate(ROW_SHAPES):
        w = weight_rows(shape, dtype, seed)
        ref_words, ref_scales, ref_biases = mx.quantize(to_mx(mx, w), group_size=group_size, bits=bits)
        q = quantize_affine(w, bits, group_size)

        assert q.scales.dtype == dtype and q.biases.dtype == dtype
        assert torch.equal(raw_bits(q.scales), raw_bits(from_mx(mx, ref_scales))), shape
        assert torch.equal(raw_bits(q.biases), raw_bits(from_mx(mx, ref_biases))), shape
        words = pack_codes(q.codes, bits)
        assert torch.equal(raw_bits(words), raw_bits(from_mx(mx, ref_words))), shape

        ref_w = mx.dequantize(ref_words, ref_scales, ref_biases, group_size=group_size, bits=bits)
        assert torch.equal(raw_bits(dequantize_affine(q)), raw_bits(from_mx(mx, ref_w))), shape


def test_keeps_leading_dims_and_accepts_views(mx):
    w = weight_rows((12, 256), torch.bfloat16, 7).reshape(3, 4, 256)
    q = quantize_affine(w, 4, 64)
    assert q.codes.shape == (3, 4, 256) and q.scales.shape == (3, 4, 4)
    ref_words, ref_scales, _ = mx.quantize(to_mx(mx, w), group_size=64, bits=4)
    assert torch.equal(raw_bits(pack_codes(q.codes, 4)), raw_bits(from_mx(mx, ref_words)))
    # A transposed (non-contiguous) view quantizes like its contiguous copy.
    wt = weight_rows((256, 64), torch.float16, 8).t()
    assert torch.equal(quantize_affine(wt, 3, 32).codes, quantize_affine(wt.contiguous(), 3, 32).codes)
    assert torch.equal(unpack_codes(pack_codes(q.codes, 4), 4, 256), q.codes)


def test_chunks_and_steps_match_mx_quantize(mx, monkeypatch):
    # 28 groups of 128 in steps of 3 groups and chunks of 6 (rounded 4 at a time): four full chunks, then a
    # chunk of one full and one partial step, so every boundary of the two-pass loop is crossed.
    w = weight_rows((7, 512), torch.float16, 9)
    whole = quantize_affine(w, 5, 128)
    monkeypatch.setattr("cpmkit.quant.affine.TORCH_GRAIN_SIZE", 3 * 128 + 1)
    monkeypatch.setattr("cpmkit.quant.affine.CHUNK_ELEMENTS", 7 * 128)
    monkeypatch.setattr("cpmkit.quant.affine.ROUND_GRAIN_SIZE", 4)
    chunked = quantize_affine(w, 5, 128)
    ref_words, ref_scales, ref_biases = mx.quantize(to_mx(mx, w), group_size=128, bits=5)
    assert torch.equal(raw_bits(pack_codes(chunked.codes, 5)), raw_bits(from_mx(mx, ref_words)))
    assert torch.equal(raw_bits(chunked.scales), raw_bits(from_mx(mx, ref_scales)))
    assert torch.equal(raw_bits(chunked.biases), raw_bits(from_mx(mx, ref_biases)))
    assert torch.equal(whole.codes, chunked.codes)


def test_rejects_unsupported_settings():
    w = torch.zeros((2, 128))
    with pytest.raises(CpmkitError, match="bits=7"):
        quantize_affine(w, 7, 64)
    with pytest.raises(CpmkitError, match="group_size=16"):
        quantize_affine(w, 4, 16)
    with pytest.raises(CpmkitError, match="layer.weight: last dimension 100"):
        quantize_affine(torch.zeros((2, 100)), 4, 32, name="layer.weight")
    with pytest.raises(CpmkitError, match="torch.int32"):
        quantize_affine(torch.zeros((2, 128), dtype=torch.int32), 4, 64)
    with pytest.raises(CpmkitError, match="at least 2 dimensions"):
        quantize_affine(torch.zeros(128), 4, 64)
