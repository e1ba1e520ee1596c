"""The BF16 reference: a checkpoint's weights, exactly as stored, run by cpmkit's torch forward."""

from __future__ import annotations

import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.tokenizer import Tokenizer
from cpmkit.verify.models import build_model
from cpmkit.verify.perplexity import Perplexity, make_windows, perplexity

# Weights keep their stored values; matmuls run in float32, which represents every bf16/fp16 value exactly
# and is the fast path of CPU BLAS.
COMPUTE_DTYPE = torch.float32


def load_reference(ck: Checkpoint, dtype: torch.dtype = COMPUTE_DTYPE, progress=iter):
    model = build_model(ck.spec, dtype=dtype)
    model.load_weights(progress(ck.stream()))
    return model.eval()


def evaluate_text(ck: Checkpoint, text: str, *, ctx: int = 512, max_chunks: int | None = None, batch: int = 1,
                  progress=iter) -> Perplexity:
    """llama-perplexity's number for the reference model on ``text``."""
    tok = Tokenizer(ck.root, ck.config)
    ids = tok.encode(text)
    windows = make_windows(ids, ctx, tok.special.bos_id if tok.special.add_bos else None, max_chunks)
    model = load_reference(ck, progress=progress)
    return perplexity(model, windows, batch)
