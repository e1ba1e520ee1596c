"""ggml-quants.c's scale searches (make_qkx2/3_quants, make_qx_quants, make_qp_quants, make_q3_quants),
vectorised over many groups at once.

Every function takes its groups position-major: ``x`` is float32 ``(n, M)`` for M groups of n values,
so the C loop ``for (i = 0; i < n; ++i)`` becomes a loop over rows of (M,) vectors and sums keep C
order (see ``ggml_float``). The fixed-size grid searches loop in Python over grid points with per-group
"best so far" state; coordinate descents loop over the n positions. Codes ``L`` come back as float32
``(n, M)`` holding the integers the C stores in its ``L`` array.

Speed: the grid loops run in preallocated buffers with in-place ops, keep only the winning grid
parameters per group and rebuild L once at the end, and use ``torch.round`` wherever the argument is
provably inside nearest_int's exact range (|f| <= 2**22), which is the same rounding (half to even).
"""

from __future__ import annotations

import numpy as np
import torch

from cpmkit.quant.ggml_float import GROUP_MAX_EPS, first_abs_max, first_min, nearest_int, rdiv, sequential_sum

QP_DESCENT_ROUNDS = 5  # make_qp_quants / make_q3_quants: at most 5 sweeps of coordinate descent
ROUND_SAFE_LIMIT = 4.0e6  # bound on |f| (with margin) below which nearest_int(f) == torch.round(f)


def _grid_numerator(base: float, step: float, i: int, nmax: int) -> float:
    """``base + step*i + nmax`` evaluated left to right in float32, like the C grid expressions."""
    return float(np.float32(base) + np.float32(step) * np.float32(i) + np.float32(nmax))


def make_qkx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                    nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants, and make_qkx3_quants with explicit weights (in this ggml the two differ only in
    ``max == min`` vs ``max <= min``, the same test for finite input).

    Fits x ≈ scale*L + min with min <= 0 and L in [0, nmax], weighted, trying nstep+1 grid scales; the
    running best ``min`` feeds the next grid point. Returns (scale (M,), the_min = -min (M,), L)."""
    n, groups = x.shape
    xmin, xmax = first_min(x), x.amax(0)
    sum_w = sequential_sum(weights, from_zero=False)  # C: sum_w = weights[0]; sum_x = sum_w * x[0]
    sum_x = sequential_sum(weights * x, from_zero=False)
    mn = torch.where(xmin > 0, 0.0, xmin)
    live = xmax != mn  # the C returns early (L = 0, scale = 0) for the others

    levels_buf, diff = torch.empty_like(x), torch.empty_like(x)
    prods = torch.empty(n, 3, groups)  # w*l, w*l*l, w*l*x per position

    def levels(iscale, shift):
        """clamp(nearest_int(iscale*(x - shift)), 0, nmax) as float32. The running min can sit near
        max, making iscale*(x - min) huge, where nearest_int returns garbage; then use its bit trick."""
        torch.sub(x, shift, out=levels_buf).mul_(iscale)
        reach = (xmax - shift).abs_().add_((xmin - shift).abs_()).mul_(iscale.abs())
        if bool(torch.where(live, reach, 0.0).amax() > ROUND_SAFE_LIMIT):
            levels_buf.copy_(nearest_int(levels_buf))
        return levels_buf.round_().clamp_(0, nmax)

    def weighted_error(scale, min_, lf):
        torch.mul(lf, scale, out=diff).add_(min_).sub_(x)
        diff.abs_() if use_mad else diff.mul_(diff)
        return sequential_sum(diff.mul_(weights))

    iscale = rdiv(nmax, xmax - mn)
    best_iscale, best_shift = iscale, mn  # the winning codes are rebuilt from these at the end
    scale = rdiv(1.0, iscale)
    best = weighted_error(scale, mn, levels(iscale, mn))
    for step in range(nstep + 1):
        iscale = rdiv(_grid_numerator(rmin, rdelta, step, nmax), xmax - mn)
        lf = levels(iscale, mn)
        torch.mul(weights, lf, out=prods[:, 0])
        torch.mul(prods[:, 0], lf, out=prods[:, 1])
        torch.mul(prods[:, 0], x, out=prods[:, 2])
        sum_l, sum_l2, sum_xl = sequential_sum(prods)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, 0.0, this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        err = weighted_error(this_scale, this_min, lf)
        accept = (D > 0) & (err < best) & live
        best_iscale = torch.where(accept, iscale, best_iscale)
        best_shift = torch.where(accept, mn, best_shift)
        best = torch.where(accept, err, best)
        scale = torch.where(accept, this_scale, scale)
        mn = torch.where(accept, this_min, mn)
    L = levels(torch.where(live, best_iscale, 0.0), best_shift)
    return torch.where(live, scale, 0.0), -mn, L


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type 1: symmetric codes l in [-nmax, nmax-1] (L = l + nmax), weights
    ``qw`` or x², 19 grid scales; returns the least-squares scale (negative for a negative peak) and L."""
    n, groups = x.shape
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    levels_buf = torch.empty_like(x)
    prods = torch.empty(n, 2, groups)  # w*x*l, w*l*l per position

    def levels(iscale):
        # |iscale*x| <= nmax + 0.9 because |x| <= |peak|: torch.round equals nearest_int
        return torch.mul(x, iscale, out=levels_buf).round_().clamp_(-nmax, nmax - 1)

    def fit(iscale):
        lf = levels(iscale)
        torch.mul(wx, lf, out=prods[:, 0])
        torch.mul(w, lf, out=prods[:, 1]).mul_(lf)
        return sequential_sum(prods)

    iscale = rdiv(-nmax, peak)
    best_iscale = iscale
    sumlx, suml2 = fit(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = rdiv(-float(np.float32(nmax) + np.float32(0.1) * np.float32(step)), peak)
        sumlx, suml2 = fit(iscale)
        accept = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(accept, iscale, best_iscale)
        scale = torch.where(accept, sumlx / suml2, scale)
        best = torch.where(accept, scale * sumlx, best)
    # the C leaves L = 0 (not nmax) in an all-zero group
    L = levels(torch.where(zero, 0.0, best_iscale)).add(nmax).mul_(~zero)
    return torch.where(zero, 0.0, scale), L


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: codes in [0, nmax] for non-negative x (sub-block scales or mins) under weights
    ``qw``: 9 grid scales, then up to 5 sweeps of coordinate descent. Returns (scale, L)."""
    mx = x.amax(0).clamp(min=0)
    zero = mx < GROUP_MAX_EPS

    def weighted_mse(scale, levels):
        diff = x - scale * levels
        return sequential_sum(qw * diff * diff)

    iscale = rdiv(nmax, mx)
    best_mse = weighted_mse(rdiv(1.0, iscale), (nearest_int(iscale * x) & 0xFF).float())  # L is uint8 in C
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = rdiv(float(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        mse = weighted_mse(rdiv(1.0, iscale_is), nearest_int(iscale_is * x).clamp_(max=nmax).float())
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_is, iscale)

    l = nearest_int(iscale * x).clamp_(max=nmax)
    lf = l.float()
    qwx = qw * x
    sumlx, suml2 = sequential_sum(torch.stack([qwx * lf, qw * lf * lf], dim=1))
    L = l & 0xFF
    for _ in range(QP_DESCENT_ROUNDS):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            w, Li = qw[i], L[i].float()
            slx = sumlx - qwx[i] * Li
            sl2 = suml2 - w * Li * Li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(max=nmax)
            nf = new_l.float()
            slx_new = slx + qwx[i] * nf
            sl2_new = sl2 + w * nf * nf
            accept = (slx > 0) & (sl2 > 0) & (new_l != L[i]) \
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[i] = torch.where(accept, new_l & 0xFF, L[i])
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not bool(changed.any()):  # a sweep without changes leaves every group as it is
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L).float()


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse: symmetric codes (weights x²) refined by coordinate descent.
    Returns (scale, L = l + nmax); an all-zero group gets L = 0."""
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    # |iscale*x| <= nmax: torch.round equals nearest_int; L holds l (int8 in the C)
    L = torch.mul(x, rdiv(-nmax, peak)).round_().clamp_(-nmax, nmax - 1)
    sumlx, suml2 = sequential_sum(torch.stack([wx * L, w * L * L], dim=1))
    for _ in range(QP_DESCENT_ROUNDS):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).float()
            slx_new = slx + wx[i] * new_l
            sl2_new = sl2 + w[i] * new_l * new_l
            accept = (slx > 0) & (new_l != Li) & (sl2_new > 0) \
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[i] = torch.where(accept, new_l, Li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not bool(changed.any()):  # a sweep without changes leaves every group as it is
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)
