"""A BitCPM release at real width: a BitCPM4-0.5B-shaped checkpoint (MiniCPM4-0.5B's shape: 24 layers, hidden 1024,
ffn 4096, vocab 73448) with random ternary linears at one granularity, released as every lossless pack, each
verified by ``cpmkit release`` against the BF16 checkpoint. Prints size, bits per weight and the verify numbers.

    python bench/ternary_shelf.py [--granularity row|group64|...] [--work /tmp/cpmkit-bench-ternary]

The packs: ternary:2bit, gguf:TQ2_0 and gguf:TQ1_0 (per-row and per-tensor scales only; TQ holds one scale per
256 weights; llama-quantize's rules put the token embedding in Q4_K), ternary:bitnet (per-tensor only),
gptq:2bit-g32 round to nearest and
mlx:2bit-g32 / mlx:8bit-g32 (their exact ternary encodings of the linears; MLX also quantizes the embedding at the
variant's bits, as mlx-lm does). The weights are random, so the perplexity means nothing; the KLD and top-1
against the reference show whether a pack is lossless.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from cpmkit.formats.safetensors import StreamingWriter
from cpmkit.spec import read_spec
from cpmkit.testing import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt"
SHAPE = {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
         "num_key_value_heads": 2, "vocab_size": 73448, "_name_or_path": "openbmb/BitCPM4-0.5B"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json")


def write_ternary_checkpoint(folder: Path, granularity: str) -> Path:
    """Random bf16 weights, every block linear s x {-1, 0, +1} at ``granularity``, one tensor at a time."""
    if (folder / "model.safetensors").is_file():
        return folder
    tiny = build_checkpoint(folder.parent / "tokenizer-source", "bitcpm4")
    folder.mkdir(parents=True, exist_ok=True)
    config = {**json.loads((tiny / "config.json").read_text()), **SHAPE}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copy(tiny / name, folder / name)
    gen = torch.Generator().manual_seed(0)
    shapes = read_spec(config).tensor_shapes()
    with StreamingWriter(folder / "model.safetensors", [(n, torch.bfloat16, s) for n, s in shapes.items()]) as writer:
        for name, dims in shapes.items():
            if len(dims) == 1:
                writer.write(name, (1 + 0.1 * torch.randn(dims, generator=gen)).to(torch.bfloat16))
            elif name.startswith("model.layers."):
                writer.write(name, _ternary(dims, granularity, gen))
            else:
                writer.write(name, (0.02 * torch.randn(dims, generator=gen)).to(torch.bfloat16))
    return folder


def _ternary(dims: tuple[int, int], granularity: str, gen: torch.Generator) -> torch.Tensor:
    rows, cols = dims
    trits = torch.randint(-1, 2, (rows, cols), generator=gen).to(torch.bfloat16)
    if granularity == "tensor":
        scale = torch.full((1, 1), 0.02)
    elif granularity == "row":
        scale = 0.01 + 0.03 * torch.rand(rows, 1, generator=gen)
    else:
        group = int(granularity.removeprefix("group"))
        scale = (0.01 + 0.03 * torch.rand(rows, cols // group, generator=gen)).repeat_interleave(group, dim=1)
    return trits * scale.to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--granularity", default="row", choices=("tensor", "row", "group128", "group64", "group32"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-ternary"))
    args = parser.parse_args()
    checkpoint = write_ternary_checkpoint(args.work / f"BitCPM4-0.5B-{args.granularity}", args.granularity)
    targets = ['{ to = "ternary:2bit" }', '{ to = "gptq:2bit-g32", rtn = true }', '{ to = "mlx:2bit-g32" }',
               '{ to = "mlx:8bit-g32" }']
    if args.granularity in ("tensor", "row"):
        targets += ['{ to = "gguf:TQ2_0" }', '{ to = "gguf:TQ1_0" }']
    if args.granularity == "tensor":
        targets.append('{ to = "ternary:bitnet" }')
    recipe = args.work / "recipe.toml"
    recipe.write_text(f"targets = [{', '.join(targets)}]\n")
    text = args.work / "heldout.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[1_000_000:], encoding="utf-8")
    shelf = args.work / f"shelf-{args.granularity}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from cpmkit.cli import main; main()", "release", str(checkpoint),
                    str(shelf), "--recipe", str(recipe), "--text", str(text), "--ctx", "256", "--chunks", "4",
                    "--no-speed", "--cache-dir", str(args.work / "cache")], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    report = json.loads((shelf / "report.json").read_text())
    print(f"BitCPM4-0.5B-shaped, ternary per {args.granularity}; release of {len(targets)} packs in {seconds:.0f} s "
          f"(2 cores); verified on {report['evaluation']['scored_tokens']} tokens\n")
    print("| artifact | size MiB | bits/weight | KLD mean | top-1 |")
    print("|---|---|---|---|---|")
    source = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"| BF16 checkpoint | {source / 2**20:.1f} | 16.00 | 0 | 1 |")
    for a in report["artifacts"]:
        print(f"| {a['name']} | {a['file_size_bytes'] / 2**20:.1f} | {a['bits_per_weight']:.2f} | "
              f"{a['kld']['mean']:.2e} | {a['top1_agreement']:.4f} |")


if __name__ == "__main__":
    main()
