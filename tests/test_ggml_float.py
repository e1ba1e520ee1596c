"""The C float semantics cpmkit.quant.ggml_float reproduces, checked against plain scalar loops."""

import numpy as np
import pytest
import torch

from cpmkit.quant import kquant_search
from cpmkit.quant.ggml_float import (
    first_abs_max,
    first_min,
    lroundf,
    nearest_int,
    nearest_int_clamped,
    rdiv,
    sequential_sum,
    sqrt,
)


def _c_loop_sum(terms: torch.Tensor, from_zero: bool) -> torch.Tensor:
    acc = terms[0] + 0.0 if from_zero else terms[0].clone()
    for t in terms[1:]:
        acc = acc + t
    return acc


@pytest.mark.parametrize("n", [1, 2, 16, 17, 32, 256, 1536])
@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 5), (4099,)])
@pytest.mark.parametrize("from_zero", [True, False])
def test_sequential_sum_is_c_loop_order(n, shape, from_zero):
    g = torch.Generator().manual_seed(n)
    terms = torch.randn(n, *shape, generator=g) * torch.exp(torch.randn(n, *shape, generator=g) * 4)
    terms[:, ..., 0] = -0.0  # an all -0.0 column: C keeps -0.0 only when it starts from terms[0]
    got, want = sequential_sum(terms, from_zero), _c_loop_sum(terms, from_zero)
    assert torch.equal(got, want)
    assert torch.equal(got.signbit(), want.signbit())


def test_sequential_sum_differs_from_pairwise():
    """The reason it exists: torch's own sum rounds differently on some columns."""
    terms = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0)) * 1e3
    assert not torch.equal(sequential_sum(terms), terms.sum(0))


def test_nearest_int_matches_c_bit_trick():
    f = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.4999998, 4194303.0, -4194303.0, 1e7, -3e9, 0.0],
                     dtype=torch.float32)
    bits = (f.numpy() + np.float32(12582912.0)).view(np.int32)
    assert nearest_int(f).tolist() == ((bits & 0x007FFFFF) - 0x00400000).tolist()
    assert nearest_int(f[:8]).tolist() == torch.round(f[:8]).int().tolist()  # half to even in range


def test_nearest_int_clamped_fast_path_and_fallback():
    f = torch.tensor([0.5, 1.5, -2.5, 7.6, 1e3])
    assert nearest_int_clamped(f, 0, 15).tolist() == [0.0, 2.0, 0.0, 8.0, 15.0]
    huge = torch.tensor([3e9, -7e6, 2.5])  # outside the exact range: the C's garbage, then clamped
    assert torch.equal(nearest_int_clamped(huge, -100, 100), nearest_int(huge).clamp(-100, 100).float())


def test_lroundf_is_half_away_from_zero():
    f = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, -127.49999, 0.0], np.float32)
    f = np.concatenate([f, np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 50])
    a = np.abs(f)
    want = np.sign(f) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))  # gguf-py's np_roundf
    assert np.array_equal(lroundf(torch.from_numpy(f)).numpy(), want.astype(np.int32))


def test_rdiv_and_sqrt_round_once():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)).abs() + 1e-3
    assert np.array_equal(rdiv(63.0, x).numpy(), np.float32(63.0) / x.numpy())
    exact = torch.sqrt(x.double()).float()  # double rounding is innocuous for sqrt
    assert torch.equal(sqrt(x), exact)


def test_first_abs_max_and_first_min_follow_c_first_occurrence():
    x = torch.tensor([[0.0, -0.0, 1.0, -3.0, 2.0, 0.0],
                      [-0.0, 0.0, -1.0, 3.0, -2.0, 0.0],
                      [0.0, 0.0, 1.0, -3.0, 2.0, -0.0]])
    amax, peak = first_abs_max(x)
    assert amax.tolist() == [0.0, 0.0, 1.0, 3.0, 2.0, 0.0]
    assert peak.tolist() == [0.0, 0.0, 1.0, -3.0, 2.0, 0.0]
    assert not peak[amax == 0].signbit().any()  # all-zero groups give +0.0 (amax starts at 0 in C)
    lo = first_min(x)
    assert lo.tolist() == [0.0, -0.0, -1.0, -3.0, -2.0, 0.0]
    assert lo.signbit().tolist() == [False, True, True, True, True, False]  # the first zero's sign


def test_search_exact_fallback_gives_the_same_codes_in_range(monkeypatch):
    """make_qkx_quants switches to nearest_int's bit trick when the running min makes iscale*(x - min)
    leave its exact range; inside the range both paths must agree."""
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w = x.abs() + 0.1
    fast = kquant_search.make_qkx_quants(x, w, 15, -1.0, 0.1, 20, use_mad=False)
    monkeypatch.setattr(kquant_search, "ROUND_SAFE_LIMIT", -1.0)
    exact = kquant_search.make_qkx_quants(x, w, 15, -1.0, 0.1, 20, use_mad=False)
    for a, b in zip(fast, exact):
        assert torch.equal(a, b)
