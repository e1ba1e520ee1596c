"""Perplexity, KL divergence and top-1 agreement, computed the way llama-perplexity does.

llama-perplexity (tools/perplexity/perplexity.cpp): tokenize the whole text once (BOS first when the
vocabulary adds one), cut it into ``n_chunk = n_tokens // ctx`` windows of ``ctx`` tokens, replace each
window's first token by BOS, and score only the second half: positions ``ctx//2 .. ctx-2`` predicting the
next token (255 tokens per 512-window). NLLs come from a max-subtracted log-softmax in float32 and are
summed in float64; the reported uncertainty is ``ppl * stderr(nll)``. Its KL mode compares a candidate's
distribution with the base's on the same scored positions (``--kl-divergence``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from cpmkit.errors import CpmkitError
from cpmkit.models.windows import Windows

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [B, T] -> logits [B, T, V]


def scored_logprobs(logits_fn: LogitsFn, windows: Windows, batch: int = 1) -> Iterator[torch.Tensor]:
    """Log-probabilities at the scored positions, one [b, ctx - ctx//2 - 1, V] float32 tensor per batch."""
    if batch < 1:
        raise CpmkitError(f"--batch {batch}: must be at least 1")
    first = windows.first_scored
    for start in range(0, windows.tokens.shape[0], batch):
        with torch.no_grad():
            logits = logits_fn(windows.tokens[start : start + batch])
        yield torch.log_softmax(logits[:, first:-1].float(), dim=-1)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    ppl_uncertainty: float  # ppl x standard error of the mean NLL, as llama-perplexity prints it
    mean_nll: float
    n_tokens: int
    n_chunks: int
    ctx: int


def nll_of(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()


def summarize_nll(nll: torch.Tensor, windows: Windows) -> Perplexity:
    mean = float(nll.mean())
    n = nll.numel()
    var = float((nll * nll).mean()) - mean * mean
    stderr = math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else 0.0
    ppl = math.exp(mean)
    return Perplexity(ppl, ppl * stderr, mean, n, windows.tokens.shape[0], windows.ctx)


def perplexity(logits_fn: LogitsFn, windows: Windows, batch: int = 1) -> Perplexity:
    targets = windows.targets
    nll = [nll_of(lp, targets[i * batch : i * batch + lp.shape[0]])
           for i, lp in enumerate(scored_logprobs(logits_fn, windows, batch))]
    return summarize_nll(torch.cat(nll).flatten(), windows)


@dataclass(frozen=True)
class Divergence:
    """A candidate's next-token distributions against the reference's, over the same scored tokens."""

    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float  # fraction of positions where both argmaxes agree
    n_tokens: int
    per_token_kld: torch.Tensor  # float64 [n_tokens], for histograms


class DivergenceAccumulator:
    """Feed (reference log-probs, candidate log-probs) batch by batch; read ``result()`` at the end.
    KL(reference || candidate) over the whole vocabulary (llama-perplexity keeps only log-probs within 16 of
    the maximum, because it stores them compressed; the difference is below its printed precision)."""

    def __init__(self) -> None:
        self._kld: list[torch.Tensor] = []
        self._same: list[torch.Tensor] = []

    def add(self, ref_logprobs: torch.Tensor, cand_logprobs: torch.Tensor) -> None:
        p = ref_logprobs.exp()
        kld = (p * (ref_logprobs - cand_logprobs)).sum(-1).clamp_min(0.0)  # clamp: float rounding below 0
        self._kld.append(kld.double().flatten().cpu())
        self._same.append((ref_logprobs.argmax(-1) == cand_logprobs.argmax(-1)).flatten().cpu())

    def result(self) -> Divergence:
        kld = torch.cat(self._kld)
        same = torch.cat(self._same)
        return Divergence(float(kld.mean()), float(torch.quantile(kld, 0.99)), float(kld.max()),
                          float(same.double().mean()), kld.numel(), kld)
