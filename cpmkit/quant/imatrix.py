"""Importance matrices: per input column of every linear, the sum over calibration tokens of the squared
activation entering it, and how many tokens entered, as llama-imatrix collects them
(tools/imatrix/imatrix.cpp ``IMatrixCollector::collect_imatrix``).

The model runs token windows (llama-perplexity's chunks: BOS first, the KV cache cleared per window); a
forward pre-hook on each linear (``cpmkit.convert.gguf.imatrix`` sets them, block by block) adds ``x**2``
summed over the tokens it saw (float32, like ggml's accumulator) and counts them. A MoE expert's linears
see only the tokens routed to it, so its count is its number of routed tokens, which is what llama-imatrix records per expert from ``GGML_OP_MUL_MAT_ID``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ActivationStats:
    """Accumulated statistics of one linear: ``sums`` float32 [in_features], ``count`` tokens."""

    sums: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # [tokens, in_features]
        self.sums += (rows * rows).sum(dim=0)
        self.count += rows.shape[0]
