"""The float32 arithmetic of ggml-quants.c, reproduced in torch so GGUF quantizers are byte-exact.

ggml-quants.c lives in libggml-base, which is compiled without ``-march``: on x86-64 every operation is
one IEEE float32 SSE instruction, with no FMA contraction and no reassociation. Matching it needs:

* every constant an exact float32 (``f32``) and scalar/tensor divisions done as tensor/tensor
  (``torch``'s ``scalar / tensor`` is ``reciprocal(tensor) * scalar``, two roundings);
* sums over a block accumulated in C loop order (``sequential_sum``): torch's and numpy's pairwise
  sums flip ~2 % of K-quant blocks;
* ``sqrt`` through numpy: torch's float32 sqrt is not correctly rounded on AVX-512 builds;
* ggml's ``nearest_int`` bit trick, ``roundf`` half away from zero, and fp16 round trips of stored scales;
* no ``torch.trunc`` (not vectorised in these builds): float -> int conversion truncates the same way.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c GROUP_MAX_EPS: below it a group counts as zero
_MAGIC = float(np.float32(12582912.0))  # 1.5 * 2**23, nearest_int's rounding constant
_HALF_BELOW = float(np.float32(0.5) - np.float32(2**-25))  # the float just below 0.5
NEAREST_INT_EXACT = 4194303.0  # nearest_int's own bound (its assert): inside it, it equals rint


def f32(value: float) -> float:
    """The float32 value of a C ``float`` constant, as a Python float torch can use without rounding."""
    return float(np.float32(value))


def rdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """``numerator / t`` with one rounding, like C's ``63.f/max_scale``."""
    return torch.div(torch.tensor(f32(numerator)), t)


def sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf`` (numpy's float32 sqrt is the IEEE instruction)."""
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even through the float32 bits of ``f + 1.5*2**23``; for
    |f| > 2**22 it returns the same garbage as the C (int32)."""
    return ((f + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def nearest_int_clamped(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32. torch.round is the same rounding and much
    faster, so it is used whenever every |f| is inside nearest_int's exact range (NaN fails the test)."""
    if f.numel() == 0 or bool(f.abs().amax() <= NEAREST_INT_EXACT):
        return torch.round(f).clamp_(lo, hi)
    return nearest_int(f).clamp_(lo, hi).float()


def lroundf(f: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` / ``lroundf`` (half away from zero) for |f| < 2**31, as int32: truncate
    f + copysign(0.5 - 2**-25, f). Adding the largest float below 0.5 carries past the next integer
    exactly when the fraction is >= 0.5 (a plain +0.5 wrongly rounds 0.49999997 up); the int
    conversion truncates toward zero like C's."""
    return (f + f.sign().mul_(_HALF_BELOW)).to(torch.int32)


def sequential_sum(terms: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 in index order, like a C ``for`` loop accumulating a float.

    ``from_zero``: the accumulator starts at ``0.0f`` (``float s = 0; s += t[i]``); otherwise at the
    first term (``float s = t[0]; s += t[i]`` for i >= 1, the same as starting from -0.0f).
    numpy reduces a C-contiguous array along a non-fast axis by adding one row at a time into the
    result (documented for ``numpy.sum``: pairwise summation is used only along the fast axis), which
    is exactly the C order, at a fraction of the cost of a Python loop of torch adds."""
    n, rest = terms.shape[0], terms.shape[1:]
    a = terms.reshape(n, -1).contiguous()
    if a.shape[1] == 1:  # one column would be the fast axis, which numpy sums pairwise
        a = a.expand(n, 2).contiguous()
    total = np.add.reduce(a.numpy(), axis=0, initial=0.0 if from_zero else -0.0)
    return torch.from_numpy(total[: max(1, terms[0].numel())]).reshape(rest)


def first_min(x: torch.Tensor) -> torch.Tensor:
    """min over dim 0 as the C loop ``if (x[i] < min) min = x[i]`` finds it: the first minimal element,
    so a zero minimum keeps the sign of the first zero (it can end up in an fp16 field)."""
    lo = x.amin(0)
    zero = (lo == 0).nonzero().flatten()
    if zero.numel():
        sub = x[:, zero].numpy()
        lo[zero] = torch.from_numpy(sub[np.argmax(sub == 0, axis=0), np.arange(sub.shape[1])])
    return lo


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) over dim 0: the largest |x| and the signed value where it first occurs, as the C
    loops ``if (ax > amax) { amax = ax; max = x[i]; }`` (amax starts at 0, so an all-zero group gives
    +0.0, which matters: it is the sign of d = max/-8)."""
    hi, lo = x.amax(0), x.amin(0)
    amax = torch.maximum(hi, -lo).abs_()  # abs: -lo of a zero group is -0.0
    peak = torch.where(hi >= -lo, hi, lo)
    tied = ((hi == -lo) & (hi > 0)).nonzero().flatten()  # both signs reach |max|: the first one wins
    if tied.numel():
        sub = x[:, tied].numpy()
        first = np.argmax(np.abs(sub) == amax[tied].numpy(), axis=0)
        peak[tied] = torch.from_numpy(sub[first, np.arange(sub.shape[1])])
    return amax, torch.where(amax > 0, peak, torch.zeros_like(peak))
