"""``cpmkit eval``: the reference model's perplexity on a text, as llama-perplexity computes it, run by the
layer-streamed runner (one block in memory at a time)."""

from __future__ import annotations

import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.models.reference import COMPUTE_DTYPE, checkpoint_source
from cpmkit.models.streamed import StreamedRunner
from cpmkit.models.windows import make_windows
from cpmkit.tokenizer import Tokenizer
from cpmkit.verify.perplexity import Perplexity, nll_of, summarize_nll


def evaluate_text(ck: Checkpoint, text: str, *, ctx: int = 512, max_chunks: int | None = None, batch: int = 1,
                  device: str | torch.device = "cpu", progress=iter) -> Perplexity:
    """llama-perplexity's number for the reference model on ``text`` (``batch`` windows per forward of a
    block)."""
    tok = Tokenizer(ck.root, ck.config)
    windows = make_windows(tok.encode(text), ctx, tok.special.bos_id if tok.special.add_bos else None, max_chunks)
    runner = StreamedRunner(checkpoint_source(ck, COMPUTE_DTYPE), device, progress=progress, batch=batch)
    targets = windows.targets
    nll = [nll_of(torch.log_softmax(logits, dim=-1), targets[i : i + 1]).cpu()
           for i, logits in enumerate(runner.logits(windows.tokens, slice(windows.first_scored, -1)))]
    return summarize_nll(torch.cat(nll).flatten(), windows)
