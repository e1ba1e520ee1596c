"""MLX mxfp4: bit-exact against mx.quantize(mode="mxfp4") / mx.dequantize on CPU."""

import pytest
import torch
from test_mlx_quant import DTYPES, ROW_SHAPES, from_mx, raw_bits, to_mx, weight_rows

from cpmkit.errors import CpmkitError
from cpmkit.formats.mlx.pack import pack_codes
from cpmkit.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4


@pytest.fixture(scope="module")
def mx():
    return pytest.importorskip("mlx.core")


def tie_rows(dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/4 on power-of-two scales: many elements land exactly between two E2M1 values,
    and group maxima sit on and just above powers of two (where the E8M0 rounding direction shows)."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(-24, 25, (64, 64), generator=gen).float() / 4
    w[:, 0] = torch.tensor([6.0, -6.0, 6.25, -6.5]).repeat(16)
    return (w * 2.0 ** torch.randint(-8, 8, (64, 1), generator=gen).float()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_exact_with_mx_quantize(mx, dtype):
    cases = [weight_rows(shape, dtype, seed) for seed, shape in enumerate(ROW_SHAPES)] + [tie_rows(dtype)]
    for w in cases:
        ref_words, ref_scales = mx.quantize(to_mx(mx, w), mode="mxfp4")
        q = quantize_mxfp4(w)
        assert q.scales.shape == ref_scales.shape
        assert torch.equal(q.scales, from_mx(mx, ref_scales)), tuple(w.shape)
        assert torch.equal(raw_bits(pack_codes(q.codes, 4)), raw_bits(from_mx(mx, ref_words))), tuple(w.shape)
        for out_dtype, mx_dtype in ((torch.bfloat16, None), (dtype, getattr(mx, str(dtype).split(".")[1]))):
            ref = mx.dequantize(ref_words, ref_scales, mode="mxfp4", dtype=mx_dtype)
            assert torch.equal(raw_bits(dequantize_mxfp4(q, out_dtype)), raw_bits(from_mx(mx, ref)))


def test_tiny_groups_become_zero_groups():
    # max|w|/6 needs 2**-130 < 2**-127, the smallest E8M0 scale: stored as an all-zero group.
    w = torch.full((1, 32), 2.0**-128)
    q = quantize_mxfp4(w)
    assert q.scales.tolist() == [[127]] and not q.codes.any()


def test_rejects_bad_input():
    with pytest.raises(CpmkitError, match="w1: last dimension 48 is not divisible by group_size 32"):
        quantize_mxfp4(torch.zeros((2, 48)), name="w1")
    with pytest.raises(CpmkitError, match="torch.int8"):
        quantize_mxfp4(torch.zeros((2, 32), dtype=torch.int8))
