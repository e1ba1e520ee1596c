"""The float32 arithmetic of ggml-quants.c, reproduced in numpy so GGUF quantizers are byte-exact.

ggml-quants.c lives in libggml-base, which is compiled without ``-march``: on x86-64 every operation is
one IEEE float32 SSE instruction, with no FMA contraction and no reassociation. Matching it needs:

* every constant an exact float32 (``f32``) and divisions done elementwise (``rdiv``; torch's
  ``scalar / tensor`` is ``reciprocal(tensor) * scalar``, two roundings);
* sums over a block accumulated in C loop order (``sequential_sum``): pairwise sums flip ~2 % of
  K-quant blocks;
* ggml's ``nearest_int`` bit trick, ``roundf`` half away from zero, and fp16 round trips of stored scales.

Why numpy and not torch: a quantizer issues thousands of array ops per chunk of rows. numpy runs each on
the calling thread with the GIL released and at about half torch's per-call cost, so a pool of threads
can quantize row chunks side by side; a torch op above its OpenMP grain size (32768 elements) would
instead split itself across all cores and wait on a barrier, which on a 2-core machine cost more than
the arithmetic. Every function takes float32 numpy arrays; ``accepts_tensors`` also lets it take CPU
torch tensors (and return tensors), the form the rest of cpmkit and its tests hold.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import numpy as np
import torch

GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c GROUP_MAX_EPS: below it a group counts as zero
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23, nearest_int's rounding constant
_HALF_BELOW = np.float32(0.5) - np.float32(2**-25)  # the float just below 0.5
NEAREST_INT_EXACT = 4194303.0  # nearest_int's own bound (its assert): inside it, it equals rint

F = TypeVar("F", bound=Callable[..., Any])


def accepts_tensors(fn: F) -> F:
    """Let a numpy routine be called with CPU torch tensors too: they are viewed as numpy arrays (no
    copy) and every array it returns comes back as a tensor."""

    def to_torch(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(to_torch(v) for v in value)
        return torch.from_numpy(np.asarray(value)) if isinstance(value, (np.ndarray, np.generic)) else value

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, torch.Tensor) for a in args):
            return fn(*args, **kwargs)
        return to_torch(fn(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args), **kwargs))

    return wrapper  # type: ignore[return-value]


def f32(value: float) -> np.float32:
    """The float32 value of a C ``float`` constant."""
    return np.float32(value)


@accepts_tensors
def rdiv(numerator: float, t: np.ndarray) -> np.ndarray:
    """``numerator / t`` with one rounding, like C's ``63.f/max_scale``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(f32(numerator), t, dtype=np.float32)


@accepts_tensors
def sqrt(t: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 ``sqrtf`` (numpy's float32 sqrt is the IEEE instruction)."""
    return np.sqrt(t)


@accepts_tensors
def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even through the float32 bits of ``f + 1.5*2**23``; for
    |f| > 2**22 it returns the same garbage as the C (int32)."""
    return ((f + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def in_exact_range(f: np.ndarray) -> bool:
    """Whether every |f| is inside nearest_int's exact range, where it equals ``np.rint`` (NaN is not)."""
    return f.size == 0 or bool(np.abs(f).max() <= NEAREST_INT_EXACT)


@accepts_tensors
def nearest_int_clamped(f: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32. np.rint is the same rounding and cheaper, so it
    is used whenever every |f| is inside nearest_int's exact range."""
    if in_exact_range(f):
        return np.clip(np.rint(f), lo, hi)
    return nearest_int(f).clip(lo, hi).astype(np.float32)


@accepts_tensors
def lroundf(f: np.ndarray) -> np.ndarray:
    """C ``roundf`` / ``lroundf`` (half away from zero) for |f| < 2**31, as int32: truncate
    f + copysign(0.5 - 2**-25, f). Adding the largest float below 0.5 carries past the next integer
    exactly when the fraction is >= 0.5 (a plain +0.5 wrongly rounds 0.49999997 up); the int
    conversion truncates toward zero like C's."""
    return (f + np.sign(f) * _HALF_BELOW).astype(np.int32)


@accepts_tensors
def sequential_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum over axis 0 in index order, like a C ``for`` loop accumulating a float.

    ``from_zero``: the accumulator starts at ``0.0f`` (``float s = 0; s += t[i]``); otherwise at the
    first term (``float s = t[0]; s += t[i]`` for i >= 1, the same as starting from -0.0f).
    numpy reduces a C-contiguous array along a non-fast axis by adding one row at a time into the
    result (pairwise summation is used only along the fast axis), which is exactly the C order."""
    n, rest = terms.shape[0], terms.shape[1:]
    a = np.ascontiguousarray(terms).reshape(n, -1)
    if a.shape[1] == 1:  # one column would be the fast axis, which numpy sums pairwise
        a = np.repeat(a, 2, axis=1)
    total = np.add.reduce(a, axis=0, initial=0.0 if from_zero else -0.0)
    return total[: max(1, terms[0].size)].reshape(rest)


@accepts_tensors
def first_min(x: np.ndarray) -> np.ndarray:
    """min over axis 0 as the C loop ``if (x[i] < min) min = x[i]`` finds it: the first minimal element,
    so a zero minimum keeps the sign of the first zero (it can end up in an fp16 field)."""
    lo = x.min(0)
    zero = np.flatnonzero(lo == 0)
    if zero.size:
        sub = x[:, zero]
        lo[zero] = sub[np.argmax(sub == 0, axis=0), np.arange(zero.size)]
    return lo


@accepts_tensors
def first_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over axis 0: the largest |x| and the signed value where it first occurs, as the C
    loops ``if (ax > amax) { amax = ax; max = x[i]; }`` (amax starts at 0, so an all-zero group gives
    +0.0, which matters: it is the sign of d = max/-8)."""
    hi, lo = x.max(0), x.min(0)
    amax = np.abs(np.where(hi >= -lo, hi, -lo))  # abs: -lo of a zero group is -0.0
    peak = np.where(hi >= -lo, hi, lo)
    tied = np.flatnonzero((hi == -lo) & (hi > 0))  # both signs reach |max|: the first one wins
    if tied.size:
        sub = x[:, tied]
        peak[tied] = sub[np.argmax(np.abs(sub) == amax[tied], axis=0), np.arange(tied.size)]
    return amax, np.where(amax > 0, peak, np.float32(0))
