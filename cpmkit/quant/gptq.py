"""GPTQ (Frantar et al. 2022): quantize a linear's weight column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's calibration inputs.

What it does, as AutoGPTQ and GPTQModel do it (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §2):

* the Hessian ``H = 2/n * X^T X`` over the n calibration tokens that reached the linear (:class:`Hessian`,
  float32; a MoE expert's only from the tokens routed to it);
* dead columns (``H[k, k] == 0``: an input never active) get ``H[k, k] = 1`` and a zero weight;
* act-order (``desc_act``): columns in order of decreasing ``H[k, k]``, so the most active inputs are
  quantized first, while most of the error can still be compensated; ``g_idx`` records each column's group;
* static groups: each contiguous group's scale and zero fixed from the unmodified weights before the sweep
  (the layout stays ``g_idx = k // group`` even with act-order, as Marlin and CPM.cu need);
* damping ``H += d * mean(diag H) * I`` with ``d`` from ``damp`` upwards in steps of ``DAMP_STEP`` until the
  Cholesky factorisation succeeds (GPTQModel's auto-increase; llm-compressor instead falls back to
  round-to-nearest, which this never does: it raises when no damping below 1 works);
* lazy batch updates over blocks of ``BLOCK_SIZE`` columns; a group's scale and zero are chosen when the sweep
  reaches its first column, from the weights as updated up to the current block (the reference behaviour).

Returns the codes, scales, zeros and ``g_idx`` (:class:`~cpmkit.quant.groups.GroupQuantized`) and what the
log records: the loss ``sum((w - q)^2 / Hinv[k, k]^2) / 2``, the damping that worked, and the time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from cpmkit.errors import CpmkitError
from cpmkit.quant.groups import GroupQuantized, GroupSpec, find_params, quantize_codes

BLOCK_SIZE = 128  # columns per lazy batch update
DEFAULT_DAMP = 0.01  # AutoGPTQ's and llm-compressor's damp_percent
DAMP_STEP = 0.01  # GPTQModel's damp_auto_increment
HESSIAN_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class GPTQSpec:
    group: GroupSpec
    act_order: bool = False  # desc_act
    static_groups: bool = False
    damp: float = DEFAULT_DAMP

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise CpmkitError(f"--damp {self.damp}: must be between 0 and 1")


class Hessian:
    """``2/n * sum x x^T`` over the calibration inputs ``x`` [..., K] given to :meth:`add` (float32)."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.tokens = 0
        self._scaled = False

    def add(self, x: torch.Tensor) -> None:
        if self._scaled:
            raise RuntimeError("Hessian.add after value()")
        rows = x.reshape(-1, x.shape[-1])
        for start in range(0, rows.shape[0], HESSIAN_CHUNK_TOKENS):
            chunk = rows[start : start + HESSIAN_CHUNK_TOKENS].to(self.sum.device, torch.float32)
            self.sum.addmm_(chunk.T, chunk)
        self.tokens += rows.shape[0]

    def value(self) -> torch.Tensor:
        """The Hessian, made from the sum in place (an 8B model's down_proj Hessian is 1 GiB: no second copy);
        nothing can be added after."""
        if not self._scaled:
            self.sum.mul_(2.0 / max(self.tokens, 1))
            self._scaled = True
        return self.sum


@dataclass(frozen=True)
class GPTQResult:
    quantized: GroupQuantized
    loss: float
    damp: float  # the damping that made H positive definite
    seconds: float
    dead_columns: int


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + d mean(diag H) I)^-1``, with d increased from ``damp`` until it exists."""
    mean_diag = float(torch.diagonal(h).mean())
    d = damp
    while d < 1:  # at most three [K, K] matrices at a time beside h
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, d
        d = round(d + DAMP_STEP, 6)
    raise CpmkitError(f"{name}: the Hessian of its calibration inputs is not positive definite even with damping "
                      f"{d:.2f}; give more or longer calibration samples")


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: GPTQSpec, name: str = "weight") -> GPTQResult:
    """GPTQ of ``w`` [N, K] (any float dtype; computed in float32) given ``hessian`` [K, K] float32, which it
    consumes (modifies in place)."""
    start = time.perf_counter()
    g = spec.group
    g.check(tuple(w.shape), name)
    n, k = w.shape
    size = g.group(k)
    w = w.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32)  # modified in place: the caller's Hessian is consumed
    del hessian  # so the act-order permutation below frees the unpermuted copy
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static = [find_params(w[:, c : c + size], g) for c in range(0, k, size)] if spec.static_groups else None
    perm = torch.argsort(torch.diagonal(h), descending=True) if spec.act_order else torch.arange(k)
    if spec.act_order:
        w, h = w[:, perm], h.index_select(0, perm)
        h = h.index_select(1, perm)
    hinv, damp = _inverse_cholesky(h, spec.damp, name)
    del h

    codes = torch.zeros(n, k, dtype=torch.uint8)
    loss = 0.0
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = None
    for i1 in range(0, k, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        q1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static[int(perm[col]) // size]
            elif col % size == 0:
                scale, zero = find_params(w[:, col : col + size], g)
                scales.append(scale)
                zeros.append(zero)
            x = w1[:, i]
            q = quantize_codes(x, scale, zero, g.maxq)
            q1[:, i] = q
            err = (x - scale * (q - zero)) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        codes[:, i1:i2] = q1.to(torch.uint8)
        loss += float(err1.double().pow(2).sum()) / 2  # sum((w - q)^2 / Hinv[k, k]^2) / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    if static is not None:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
        g_idx = torch.arange(k, dtype=torch.int32) // size
    else:
        g_idx = (torch.arange(k, dtype=torch.int32) // size)[invperm]
    quantized = GroupQuantized(g, codes[:, invperm].contiguous(), torch.stack(scales, dim=1).to(g.scale_dtype),
                               torch.stack(zeros, dim=1).to(torch.uint8), g_idx.contiguous())
    return GPTQResult(quantized, loss if math.isfinite(loss) else float("inf"), damp,
                      time.perf_counter() - start, int(dead.sum()))
