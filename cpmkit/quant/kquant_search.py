"""ggml-quants.c's scale searches (make_qkx2/3_quants, make_qx_quants, make_qp_quants, make_q3_quants),
vectorised over many groups at once.

Every function takes its groups position-major: ``x`` is float32 ``(n, M)`` for M groups of n values,
so the C loop ``for (i = 0; i < n; ++i)`` becomes a loop over rows of (M,) vectors and sums keep C
order (see ``ggml_float``). The fixed-size grid searches loop in Python over grid points with per-group
"best so far" state; coordinate descents loop over the n positions. Codes ``L`` come back as float32
``(n, M)`` holding the integers the C stores in its ``L`` array.

Speed: the grid loops run in preallocated buffers with ``out=`` ufuncs, keep only the winning grid
parameters per group and rebuild L once at the end, and use ``np.rint`` wherever the argument is
provably inside nearest_int's exact range (|f| <= 2**22), which is the same rounding (half to even).
The coordinate descents drop the groups that have settled after each sweep, so later sweeps only
touch the few groups still changing.
"""

from __future__ import annotations

import numpy as np

from cpmkit.quant.ggml_float import (
    GROUP_MAX_EPS,
    accepts_tensors,
    f32,
    first_abs_max,
    first_min,
    in_exact_range,
    nearest_int,
    rdiv,
    sequential_sum,
)

QP_DESCENT_ROUNDS = 5  # make_qp_quants / make_q3_quants: at most 5 sweeps of coordinate descent
ROUND_SAFE_LIMIT = 4.0e6  # bound on |f| (with margin) below which nearest_int(f) == rint(f)
ZERO = np.float32(0)
GRID_BLOCK_ELEMENTS = 1 << 17  # make_qx_quants: elements of one (n, 20, groups) block, about L2-sized


def _grid_numerator(base: float, step: float, i: int, nmax: int) -> np.float32:
    """``base + step*i + nmax`` evaluated left to right in float32, like the C grid expressions."""
    return f32(base) + f32(step) * f32(i) + f32(nmax)


@accepts_tensors
def make_qkx_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants, and make_qkx3_quants with explicit weights (in this ggml the two differ only in
    ``max == min`` vs ``max <= min``, the same test for finite input).

    Fits x ≈ scale*L + min with min <= 0 and L in [0, nmax], weighted, trying nstep+1 grid scales; the
    running best ``min`` feeds the next grid point. Returns (scale (M,), the_min = -min (M,), L)."""
    n, groups = x.shape
    xmin, xmax = first_min(x), x.max(0)
    x_range = xmax - xmin
    sum_w = sequential_sum(weights, from_zero=False)  # C: sum_w = weights[0]; sum_x = sum_w * x[0]
    sum_x = sequential_sum(weights * x, from_zero=False)
    mn = np.where(xmin > 0, ZERO, xmin)
    live = xmax != mn  # the C returns early (L = 0, scale = 0) for the others
    numerators = [f32(nmax)] + [_grid_numerator(rmin, rdelta, step, nmax) for step in range(nstep + 1)]
    # every iscale is numerator/(max - shift), so |iscale*(x - shift)| <= |numerator| + |iscale|*(max - min)
    round_limit = ROUND_SAFE_LIMIT - max(abs(float(v)) for v in numerators)

    lf, diff, wl, wl2, wlx = (np.empty_like(x) for _ in range(5))

    def levels(iscale, shift):
        """clamp(nearest_int(iscale*(x - shift)), 0, nmax) into ``lf``. The running min can sit near max,
        making iscale*(x - min) huge, where nearest_int returns garbage; then use its bit trick (the
        bound is NaN, ignored by fmax, only in groups that are not live)."""
        np.subtract(x, shift, out=lf)
        np.multiply(lf, iscale, out=lf)
        if np.fmax.reduce(np.abs(iscale) * x_range) > round_limit:
            lf[...] = nearest_int(lf)
        np.rint(lf, out=lf)
        return np.clip(lf, 0, nmax, out=lf)

    def weighted_error(scale, min_):
        np.multiply(lf, scale, out=diff)
        np.add(diff, min_, out=diff)
        np.subtract(diff, x, out=diff)
        np.abs(diff, out=diff) if use_mad else np.multiply(diff, diff, out=diff)
        return sequential_sum(np.multiply(diff, weights, out=diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = rdiv(nmax, xmax - mn)
        scale = rdiv(1.0, iscale)
        levels(iscale, mn)
        best = np.where(live, weighted_error(scale, mn), -np.inf)  # -inf: nothing beats it where not live
        # each grid point's shift, iscale and fit; the winner's codes are rebuilt at the end
        shifts, iscales, scales = [mn], [iscale], [scale]
        winner = np.zeros(groups, dtype=np.intp)
        for step, numerator in enumerate(numerators[1:], start=1):
            iscale = numerator / (xmax - mn)
            levels(iscale, mn)
            np.multiply(weights, lf, out=wl)
            np.multiply(wl, lf, out=wl2)
            np.multiply(wl, x, out=wlx)
            sum_l, sum_l2, sum_xl = sequential_sum(wl), sequential_sum(wl2), sequential_sum(wlx)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, ZERO, this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            err = weighted_error(this_scale, this_min)
            accept = (D > 0) & (err < best)
            shifts.append(mn)
            iscales.append(iscale)
            scales.append(this_scale)
            np.copyto(winner, step, where=accept)
            best = np.where(accept, err, best)
            mn = np.where(accept, this_min, mn)
        pick = lambda history: np.take_along_axis(np.stack(history), winner[None], 0)[0]  # noqa: E731
        L = levels(np.where(live, pick(iscales), ZERO), pick(shifts))
    return np.where(live, pick(scales), ZERO), -mn, L


@accepts_tensors
def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1: symmetric codes l in [-nmax, nmax-1] (L = l + nmax), weights
    ``qw`` or x², 19 grid scales; returns the least-squares scale (negative for a negative peak) and L.

    The grid points do not depend on each other, so all 20 are evaluated in one pass over each block of
    groups (arrays (n, 20, groups in the block)); only the choice of the best runs point by point."""
    n, groups = x.shape
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    # C order: -nmax/max, then -(nmax + 0.1*is)/max for is = -9..9 without 0
    numerators = [-f32(nmax)] + [-(f32(nmax) + f32(0.1) * f32(step)) for step in range(-9, 10) if step]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscales = np.stack([rdiv(v, peak) for v in numerators])  # (20, groups)
        sumlx, suml2 = np.empty_like(iscales), np.empty_like(iscales)
        block = max(1, GRID_BLOCK_ELEMENTS // (n * len(numerators)))
        for c in range(0, groups, block):
            cols = slice(c, c + block)
            # |iscale*x| <= nmax + 0.9 because |x| <= |peak|: np.rint equals nearest_int
            L = np.multiply(x[:, None, cols], iscales[None, :, cols])  # (n, 20, block)
            np.rint(L, out=L)
            np.clip(L, -nmax, nmax - 1, out=L)
            sumlx[:, cols] = sequential_sum(wx[:, None, cols] * L)
            wl = np.multiply(w[:, None, cols], L)
            suml2[:, cols] = sequential_sum(np.multiply(wl, L, out=wl))
        scales = sumlx / suml2
        scales[0] = np.where(suml2[0] != 0, scales[0], ZERO)
        candidates = scales * sumlx  # best = scale*sumlx if the point is taken
        sumlx_sq = sumlx * sumlx
        positive = suml2 > 0
        best, winner = candidates[0], np.zeros(groups, dtype=np.intp)
        for step in range(1, len(numerators)):
            accept = positive[step] & (sumlx_sq[step] > best * suml2[step])
            np.copyto(winner, step, where=accept)
            best = np.where(accept, candidates[step], best)
        pick = lambda a: np.take_along_axis(a, winner[None], 0)[0]  # noqa: E731
        # the C leaves L = 0 (not nmax) in an all-zero group
        L = np.clip(np.rint(x * np.where(zero, ZERO, pick(iscales))), -nmax, nmax - 1)
    L += nmax
    L *= ~zero
    return np.where(zero, ZERO, pick(scales)), L


def _descend(x: np.ndarray, w: np.ndarray, wx: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray,
             nmax: int, qp: bool) -> tuple[np.ndarray, np.ndarray]:
    """The coordinate descent of make_qp_quants (``qp``) and make_q3_quants: up to 5 sweeps over the
    positions, each trying l = nearest_int(x*sl2/slx) and keeping it when it raises sumlx²/suml2. ``L``
    (float codes) is updated in place; returns the final (sumlx, suml2).

    make_qp_quants clamps l to <= nmax only, stores it in a uint8_t (a negative l wraps) and tries only
    where sl2 > 0; make_q3_quants clamps to [-nmax, nmax-1] and keeps l only if the new sl2 > 0.
    A group whose sweep changed nothing would repeat itself, so it leaves the active set (the C's
    per-group ``if (!n_changed) break``); later sweeps run on the compacted active groups."""
    lo, hi = (None, nmax) if qp else (-nmax, nmax - 1)
    active = np.arange(x.shape[1])
    xa, wa, wxa, La, slxa, sl2a = x, w, wx, L.copy(), sumlx.copy(), suml2.copy()
    for _ in range(QP_DESCENT_ROUNDS):
        changed = np.zeros(active.size, dtype=bool)
        for i in range(x.shape[0]):
            Li, wi, wxi = La[i], wa[i], wxa[i]
            slx = slxa - wxi * Li
            sl2 = sl2a - wi * Li * Li
            f = xa[i] * sl2 / slx
            new_l = np.clip(np.rint(f), lo, hi) if in_exact_range(f) else \
                nearest_int(f).clip(lo, hi).astype(np.float32)
            slx_new = slx + wxi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            accept = (slx > 0) & (new_l != Li) & (slx_new * slx_new * sl2a > slxa * slxa * sl2_new)
            accept &= (sl2 > 0) if qp else (sl2_new > 0)
            np.copyto(Li, np.mod(new_l, 256) if qp else new_l, where=accept)
            np.copyto(slxa, slx_new, where=accept)
            np.copyto(sl2a, sl2_new, where=accept)
            changed |= accept
        L[:, active], sumlx[active], suml2[active] = La, slxa, sl2a
        if not changed.all():
            keep = np.flatnonzero(changed)
            if keep.size == 0:
                break
            active = active[keep]
            xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], La[:, keep]
            slxa, sl2a = slxa[keep], sl2a[keep]
    return sumlx, suml2


@accepts_tensors
def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: codes in [0, nmax] for non-negative x (sub-block scales or mins) under weights
    ``qw``: 9 grid scales, then up to 5 sweeps of coordinate descent. Returns (scale, L)."""
    mx = np.maximum(x.max(0), ZERO)
    zero = mx < GROUP_MAX_EPS

    def weighted_mse(scale, levels):
        diff = x - scale * levels
        return sequential_sum(qw * diff * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = rdiv(nmax, mx)
        # L is uint8 in the C
        best_mse = weighted_mse(rdiv(1.0, iscale), (nearest_int(iscale * x) & 0xFF).astype(np.float32))
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = rdiv(f32(0.1) * f32(step) + f32(nmax), mx)
            levels = nearest_int(iscale_is * x).clip(max=nmax).astype(np.float32)
            mse = weighted_mse(rdiv(1.0, iscale_is), levels)
            better = mse < best_mse
            best_mse = np.where(better, mse, best_mse)
            iscale = np.where(better, iscale_is, iscale)

        l = nearest_int(iscale * x).clip(max=nmax)
        lf = l.astype(np.float32)
        qwx = qw * x
        sumlx, suml2 = sequential_sum(np.stack([qwx * lf, qw * lf * lf], axis=1))
        L = (l & 0xFF).astype(np.float32)  # a negative (garbage) code wraps like the C's uint8_t
        sumlx, suml2 = _descend(x, qw, qwx, L, sumlx, suml2, nmax, qp=True)
        scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    return np.where(zero, ZERO, scale), np.where(zero, ZERO, L)


@accepts_tensors
def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: symmetric codes (weights x²) refined by coordinate descent.
    Returns (scale, L = l + nmax); an all-zero group gets L = 0."""
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # |iscale*x| <= nmax: np.rint equals nearest_int; L holds l (int8 in the C)
        L = np.clip(np.rint(x * rdiv(-nmax, peak)), -nmax, nmax - 1)
        sumlx, suml2 = sequential_sum(np.stack([wx * L, w * L * L], axis=1))
        sumlx, suml2 = _descend(x, w, wx, L, sumlx, suml2, nmax, qp=False)
        scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    return np.where(zero, ZERO, scale), np.where(zero, ZERO, L + nmax)
