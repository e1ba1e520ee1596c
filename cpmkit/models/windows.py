"""Token windows, cut from a text the way llama-perplexity cuts them: evaluation windows for ``eval`` and
``verify``, calibration windows for the importance matrix, GPTQ and AWQ.

llama-perplexity (tools/perplexity/perplexity.cpp): tokenize the whole text once (BOS first when the
vocabulary adds one), cut it into ``n_chunk = n_tokens // ctx`` windows of ``ctx`` tokens and replace each
window's first token by BOS; only the second half of each window is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpmkit.errors import CpmkitError


@dataclass(frozen=True)
class Windows:
    """The evaluation windows: ``tokens`` [n_chunk, ctx] (first token already BOS where used)."""

    tokens: torch.Tensor
    ctx: int

    @property
    def first_scored(self) -> int:
        return self.ctx // 2

    @property
    def targets(self) -> torch.Tensor:
        """Next-token targets of the scored positions, [n_chunk, ctx - ctx//2 - 1]."""
        return self.tokens[:, self.first_scored + 1 :]

    @property
    def n_scored(self) -> int:
        return self.targets.numel()


def make_windows(tokens: list[int], ctx: int, bos_id: int | None, max_chunks: int | None = None) -> Windows:
    if ctx < 4:
        raise CpmkitError(f"--ctx {ctx} is too small (at least 4 tokens)")
    if max_chunks is not None and max_chunks < 1:
        raise CpmkitError(f"--chunks {max_chunks}: must be at least 1")
    n_chunk = len(tokens) // ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    if n_chunk < 1:
        raise CpmkitError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    t = torch.tensor(tokens[: n_chunk * ctx], dtype=torch.long).reshape(n_chunk, ctx)
    if bos_id is not None:
        t[:, 0] = bos_id
    return Windows(t, ctx)


def calibration_windows(tokens: list[int], n: int, length: int, bos_id: int | None, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random starts in ``tokens`` (seeded: the same text gives the same
    windows), each starting with BOS when the vocabulary adds one: GPTQ's and AWQ's calibration samples."""
    if length < 2:
        raise CpmkitError(f"--seqlen {length}: must be at least 2")
    if n < 1:
        raise CpmkitError(f"--nsamples {n}: must be at least 1")
    if len(tokens) < length:
        raise CpmkitError(f"the calibration text has {len(tokens)} tokens, fewer than one sample of --seqlen {length}")
    ids = torch.tensor(tokens, dtype=torch.long)
    starts = torch.randint(0, len(tokens) - length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([ids[s : s + length] for s in starts.tolist()])
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows
