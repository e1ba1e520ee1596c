"""Train cpmkit's built-in demo model and write it as a MiniCPM repo folder (run by hand; the output is
committed as package data under cpmkit/demo/).

The model is a MiniCPM4-style ``MiniCPMForCausalLM`` (muP scalings, LongRoPE, GQA, tied head) of about
4.6M parameters, trained with cpmkit's own reference forward on the first TRAIN_CHARS characters of
../shared/corpus/tinyshakespeare.txt with the demo SentencePiece tokenizer (scripts/make_tokenizers.py).
It then writes:

- ``cpmkit/demo/model/``: config.json, generation_config.json, model.safetensors (bf16), beside the
  tokenizer files;
- ``cpmkit/demo/eval.txt``: text sampled from the trained model with a fixed seed, the built-in evaluation
  text, so perplexity needs no download;
- ``cpmkit/demo/TRAINING.json``: the run's settings and its perplexity on the held-out corpus text
  (llama-perplexity's method, ctx 512) against a unigram baseline.

    python scripts/train_demo.py [--steps 1500] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cpmkit.checkpoint import Checkpoint
from cpmkit.models import KVCache, build_model
from cpmkit.models.reference import load_reference
from cpmkit.models.windows import make_windows
from cpmkit.spec import read_spec
from cpmkit.testing import longrope_factors
from cpmkit.tokenizer import Tokenizer
from cpmkit.verify.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "cpmkit" / "demo"
MODEL_DIR = DEMO / "model"
TRAIN_CHARS = 1_000_000  # the same split as scripts/make_tokenizers.py
EVAL_CTX = 512

FACTORS = longrope_factors(32, top=8.0)
CONFIG = {
    "_name_or_path": "cpmkit/demo",
    "architectures": ["MiniCPMForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": [2, 2048],
    "pad_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.1,
    "intermediate_size": 768,
    "max_position_embeddings": 1024,
    "model_type": "minicpm",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"rope_type": "longrope", "long_factor": FACTORS, "short_factor": FACTORS,
                     "original_max_position_embeddings": 1024},
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "vocab_size": 2056,
    "scale_emb": 12,
    "dim_model_base": 64,
    "scale_depth": 1.4,
    "tie_word_embeddings": True,
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 2048], "pad_token_id": 2, "do_sample": True,
                     "temperature": 0.8, "top_k": 40}


def init_weights(spec, seed: int) -> dict[str, torch.Tensor]:
    """Small normal init; the two matrices that write into the residual stream are scaled down by
    sqrt(2 L), as in GPT-2."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.tensor_shapes().items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * spec.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) \
                else 0.02
            out[name] = std * torch.randn(shape, generator=gen)
    return out


def train(spec, ids: torch.Tensor, args) -> torch.nn.Module:
    model = build_model(spec)
    model.load_weights(init_weights(spec, args.seed).items())
    model.train()
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, ids.numel() - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[o : o + args.seq + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.perf_counter() - start:7.1f} s",
                  flush=True)
    return model.eval()


def save(model, spec) -> None:
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()
             if name in spec.tensor_shapes()}
    save_file(state, str(MODEL_DIR / "model.safetensors"), metadata={"format": "pt"})
    (MODEL_DIR / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (MODEL_DIR / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


@torch.no_grad()
def sample_text(model, tok: Tokenizer, seed: int, segments: int, tokens_per_segment: int) -> str:
    """Sample with temperature and top-k from BOS, one segment at a time, with a KV cache."""
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(segments):
        cache = KVCache()
        ids = [tok.special.bos_id]
        logits = model(torch.tensor([ids]), cache)[0, -1]
        for _ in range(tokens_per_segment):
            top = torch.topk(logits / GENERATION_CONFIG["temperature"], GENERATION_CONFIG["top_k"])
            choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)].item()
            if choice in tok.special.eos_ids:
                break
            ids.append(choice)
            logits = model(torch.tensor([[choice]]), cache)[0, -1]
        texts.append(tok.decode(ids[1:]).strip())
    return "\n\n".join(texts) + "\n"


def unigram_perplexity(train_ids: torch.Tensor, windows, vocab: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies of the training tokens on the same scored tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[windows.targets.flatten()].mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = args.corpus.read_text(encoding="utf-8")
    tok = Tokenizer(MODEL_DIR, CONFIG)
    train_ids = torch.tensor(tok.encode(text[:TRAIN_CHARS], add_bos=False))
    spec = read_spec(CONFIG)
    print(f"{spec.parameter_count():,} parameters, {train_ids.numel():,} training tokens", flush=True)
    model = train(spec, train_ids, args)
    save(model, spec)

    # Measure the model as shipped: bf16 weights read back through the checkpoint reader.
    reference = load_reference(Checkpoint.open(MODEL_DIR))
    held_out = make_windows(tok.encode(text[TRAIN_CHARS:]), EVAL_CTX, tok.special.bos_id)
    result = perplexity(reference, held_out, batch=4)
    (DEMO / "eval.txt").write_text(sample_text(reference, tok, args.seed, segments=24, tokens_per_segment=600),
                                   encoding="utf-8")
    report = {"parameters": spec.parameter_count(), "training_tokens": train_ids.numel(), **vars(args),
              "corpus": args.corpus.name, "held_out_chars": len(text) - TRAIN_CHARS, "eval_ctx": EVAL_CTX,
              "held_out_ppl": round(result.ppl, 3), "held_out_ppl_uncertainty": round(result.ppl_uncertainty, 3),
              "held_out_scored_tokens": result.n_tokens,
              "unigram_ppl": round(unigram_perplexity(train_ids, held_out, spec.vocab_size), 3)}
    report["corpus"] = str(report["corpus"])
    (DEMO / "TRAINING.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
