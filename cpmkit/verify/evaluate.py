"""``cpmkit eval``: the reference model's perplexity on a text, as llama-perplexity computes it."""

from __future__ import annotations

from cpmkit.checkpoint import Checkpoint
from cpmkit.models.reference import load_reference
from cpmkit.models.windows import make_windows
from cpmkit.tokenizer import Tokenizer
from cpmkit.verify.perplexity import Perplexity, perplexity


def evaluate_text(ck: Checkpoint, text: str, *, ctx: int = 512, max_chunks: int | None = None, batch: int = 1,
                  progress=iter) -> Perplexity:
    """llama-perplexity's number for the reference model on ``text``."""
    tok = Tokenizer(ck.root, ck.config)
    ids = tok.encode(text)
    windows = make_windows(ids, ctx, tok.special.bos_id if tok.special.add_bos else None, max_chunks)
    model = load_reference(ck, progress=progress)
    return perplexity(model, windows, batch)
