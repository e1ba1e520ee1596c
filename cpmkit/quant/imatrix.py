"""Importance matrices: per input column of every linear, the sum over calibration tokens of the squared
activation entering it, and how many tokens entered, as llama-imatrix collects them
(tools/imatrix/imatrix.cpp ``IMatrixCollector::collect_imatrix``).

The model runs token windows (llama-perplexity's chunks: BOS first, the KV cache cleared per window); a
forward pre-hook on each linear adds ``x**2`` summed over the tokens it saw (float32, like ggml's
accumulator) and counts them. A MoE expert's linears see only the tokens routed to it, so its count is its
number of routed tokens, which is what llama-imatrix records per expert from ``GGML_OP_MUL_MAT_ID``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass
class ActivationStats:
    """Accumulated statistics of one linear: ``sums`` float32 [in_features], ``count`` tokens."""

    sums: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # [tokens, in_features]
        self.sums += (rows * rows).sum(dim=0)
        self.count += rows.shape[0]


def collect_activation_stats(model: nn.Module, windows: torch.Tensor, names: list[str], *, batch: int = 1,
                             progress: Callable[[Iterable], Iterable] = iter) -> dict[str, ActivationStats]:
    """Run ``model`` (ids [B, T] -> logits) over ``windows`` [n_window, T], ``batch`` windows per forward,
    and return the statistics of every module in ``names`` (module paths, e.g. "model.layers.0.mlp.up_proj")."""
    stats: dict[str, ActivationStats] = {}
    handles = []

    def hook_for(name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.numel():
                stats[name].add(x.detach())
        stats[name] = ActivationStats(torch.zeros(module.in_features, dtype=torch.float32))
        return module.register_forward_pre_hook(hook)

    try:
        for name in names:
            handles.append(hook_for(name, model.get_submodule(name)))
        with torch.no_grad():
            for start in progress(range(0, windows.shape[0], batch)):
                model(windows[start : start + batch])
    finally:
        for h in handles:
            h.remove()
    return stats
