"""AWQ (Lin et al. 2023), as AutoAWQ 0.2.9 runs it (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §3.4): scale the
input channels of linears that read the same input so the ones that see large activations lose less to
rounding, fold the inverse scale into what produces the input, clip each weight group's range, then round to
nearest on the asymmetric group grid.

* **Scale search** (:func:`search_scale`): per input channel ``x_mean = mean |x|`` over the calibration tokens
  and ``w_mean`` = the mean over the group's weight rows of ``|w| / max |w|`` within each quantization group;
  candidates ``s = x_mean^r / (w_mean^(1-r) + 1e-4)`` (duo scaling; ``x_mean^r`` without it), clamped at 1e-4
  and divided by ``sqrt(max s * min s)``, for ``r = i / n_grid``, ``i = 0 .. n_grid - 1``; each candidate's
  linears become ``Q(W * s) / s`` and the one whose module output (attention, MLP, or the linear itself) is
  closest to the unquantized output in mean squared error wins.
* **Clip search** (:func:`search_clip`): per output channel and group, the largest ``|w|`` is shrunk by
  ``1 - i / 20``, ``i = 0 .. 9``, keeping the one whose group partial products ``sum_G x * Q(w)`` are closest to
  the unclipped ones over at most ~1,000 sampled tokens. Skipped for q/k projections (their error is hidden by
  softmax), as AutoAWQ does.
* The grid (:func:`pseudo_quantize`) is cpmkit's asymmetric group grid (``cpmkit.quant.groups``), which keeps 0
  representable; AutoAWQ's own omits 0 and collapses groups of one sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cpmkit.quant.groups import GroupSpec, find_params, quantize_codes

N_GRID = 20  # AutoAWQ's hard-coded grid
CLIP_STEPS, CLIP_MAX_SHRINK = 20, 0.5  # shrink by 0, 1/20, ..., 9/20
CLIP_TOKENS = 512  # tokens are sampled every n // 512 (AutoAWQ: 512 to 1023 tokens)
SKIP_CLIP = ("q_", "k_")  # substrings of the linears whose clipping AutoAWQ skips
EPS = 1e-4


@dataclass(frozen=True)
class AWQSpec:
    group: GroupSpec
    duo_scaling: bool = True
    n_grid: int = N_GRID
    clip: bool = False  # AutoAWQ clips; see the awq plug-in's --clip


def pseudo_quantize(w: torch.Tensor, group: GroupSpec) -> torch.Tensor:
    """``w`` [N, K] rounded to the group grid and back (float32)."""
    n, k = w.shape
    size = group.group(k)
    x = w.float().reshape(n * (k // size), size)
    scale, zero = find_params(x, group)
    codes = quantize_codes(x, scale, zero, group.maxq)
    return ((codes - zero[:, None]) * scale[:, None]).reshape(n, k)


def weight_mean(weights: Sequence[torch.Tensor], group: GroupSpec) -> torch.Tensor:
    """Per input channel, the mean over all rows of ``|w|`` relative to its group's largest ``|w|``."""
    w = torch.cat([x.float() for x in weights])
    rows, k = w.shape
    size = group.group(k)
    g = w.abs().reshape(rows, k // size, size)
    return (g / (g.amax(dim=-1, keepdim=True) + 1e-6)).reshape(rows, k).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool) -> torch.Tensor:
    s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + EPS) if duo else x_mean.pow(ratio)
    s = s.clamp(min=EPS)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass(frozen=True)
class ScaleResult:
    scales: torch.Tensor  # [K] float32
    ratio: float
    loss: float
    loss_unscaled: float  # the loss of plain rounding, for the log


def search_scale(x_mean: torch.Tensor, weights: Sequence[torch.Tensor],
                 set_weights: Callable[[list[torch.Tensor]], None], output_error: Callable[[], float],
                 spec: AWQSpec) -> ScaleResult:
    """The best per-input-channel scale for the linears holding ``weights`` (float32 [N_i, K]).
    ``set_weights(ws)`` puts candidate weights in place; ``output_error()`` is the mean squared error of the
    inspected module's output against its unquantized output. The original weights are put back."""
    w_mean = weight_mean(weights, spec.group)
    set_weights([pseudo_quantize(w, spec.group) for w in weights])
    unscaled = output_error()
    best = None
    for i in range(spec.n_grid):
        ratio = i / spec.n_grid
        s = candidate_scales(x_mean, w_mean, ratio, spec.duo_scaling)
        set_weights([pseudo_quantize(w * s, spec.group) / s for w in weights])
        loss = output_error()
        if best is None or loss < best.loss:
            best = ScaleResult(s, ratio, loss, unscaled)
    set_weights(list(weights))
    assert best is not None
    return best


def search_clip(w: torch.Tensor, x: torch.Tensor, group: GroupSpec) -> torch.Tensor:
    """Per output channel and group, the clipping bound ``[N, K/G, 1]`` for ``w`` [N, K] (float32) given its
    inputs ``x`` [tokens, K] (already divided by the AWQ scale)."""
    n, k = w.shape
    size = group.group(k)
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)].float()
    xg = x.reshape(x.shape[0], k // size, size).transpose(0, 1)  # [groups, tokens, G]
    best_bound = torch.empty(n, k // size, 1)
    batch = 256 if n % 256 == 0 else 64 if n % 64 == 0 else n
    for start in range(0, n, batch):
        wb = w[start : start + batch].float().reshape(-1, k // size, size)  # [oc, groups, G]
        bound = wb.abs().amax(dim=-1, keepdim=True)
        reference = torch.einsum("gtc,ogc->ogt", xg, wb)
        errors, bounds = [], []
        for i in range(int(CLIP_MAX_SHRINK * CLIP_STEPS)):
            limit = bound * (1 - i / CLIP_STEPS)
            clipped = torch.maximum(torch.minimum(wb, limit), -limit)
            q = pseudo_quantize(clipped.reshape(wb.shape[0], k), group).reshape(wb.shape)
            errors.append((torch.einsum("gtc,ogc->ogt", xg, q) - reference).pow(2).mean(-1))
            bounds.append(limit)
        choice = torch.stack(errors).argmin(0)  # [oc, groups]: the first of equal errors, as a strict < keeps
        best_bound[start : start + batch] = torch.stack(bounds).squeeze(-1).gather(0, choice[None])[0, ..., None]
    return best_bound


def apply_clip(w: torch.Tensor, bound: torch.Tensor, group: GroupSpec) -> torch.Tensor:
    n, k = w.shape
    size = group.group(k)
    g = w.reshape(n, k // size, size)
    return torch.maximum(torch.minimum(g, bound), -bound).reshape(n, k)


def clips(name: str) -> bool:
    """Whether AutoAWQ searches a clipping bound for the linear ``name`` (not for q/k projections)."""
    return not any(part in name.rpartition(".")[2] for part in SKIP_CLIP)
