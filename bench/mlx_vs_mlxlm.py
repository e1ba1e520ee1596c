"""cpmkit's MLX conversion against ``python -m mlx_lm convert -q`` on the same random checkpoint, on this CPU.

The checkpoint has MiniCPM4-0.5B's layer shapes (hidden 1024, FFN 4096, 16 heads, 2 KV heads, vocabulary
73448) with fewer layers, untied and with plain RoPE, so that mlx-lm's own rules give the same tensors as
ours: no tied-head rewrite, and no LongRoPE config, on which mlx-lm's tokenizer loading crashes under
transformers 5 (MLX.md §3.4). It is written once, tensor by tensor, in bf16.

Each converter runs in its own process (default recipe: 4-bit, group size 64), imports included; reported:
wall time and peak RSS (GNU time's %e and %M of that process), and whether every tensor of the two folders
is identical (dtype, shape and bytes).

    python bench/mlx_vs_mlxlm.py [--layers 8] [--workdir /tmp/cpmkit-mlx-bench] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cpmkit.formats.mlx_folder import index_tensors
from cpmkit.formats.safetensors import StreamingWriter
from cpmkit.spec import read_spec
from cpmkit.testing import build_checkpoint

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json")
TIME = "/usr/bin/time"  # GNU time: %e wall seconds, %M peak RSS in KiB


def bench_config(layers: int) -> dict:
    """MiniCPM4-0.5B's config keys and widths (ARCHITECTURES.md), untied, rope_scaling null."""
    return {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "bos_token_id": 1,
            "eos_token_id": [2, 73440], "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 4096,
            "max_position_embeddings": 32768, "num_attention_heads": 16, "num_hidden_layers": layers,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
            "torch_dtype": "bfloat16", "vocab_size": 73448, "scale_emb": 12, "dim_model_base": 256,
            "scale_depth": 1.4, "tie_word_embeddings": False}


def write_checkpoint(folder: Path, config: dict) -> int:
    """Random bf16 weights, one tensor at a time, plus a real tokenizer; returns the weight bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny = build_checkpoint(folder / "tiny", "minicpm4")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tiny / name, folder / name)
    shutil.rmtree(tiny)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = read_spec(config).tensor_shapes()
    entries = [(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    with StreamingWriter(folder / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, _, shape in entries:
            scale = 1.0 if len(shape) == 1 else 0.02
            writer.write(name, (scale * torch.randn(shape, generator=gen)).to(torch.bfloat16))
    return sum(math.prod(s) * 2 for s in shapes.values())


CPMKIT = ("from pathlib import Path; import sys; from cpmkit.checkpoint import Checkpoint; "
          "from cpmkit.convert.mlx import convert_to_mlx; "
          "convert_to_mlx(Checkpoint.open(sys.argv[1]), Path(sys.argv[2]))")


def run(cmd: list[str], workdir: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, measured by /usr/bin/time: a child forked
    from this (torch-importing) process would count this process's pages in its ru_maxrss."""
    report = workdir / "time.txt"
    proc = subprocess.run([TIME, "-f", "%e %M", "-o", str(report), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr.decode()[-3000:]}")
    wall, kib = report.read_text().split()[-2:]
    return float(wall), int(kib) * 1024


def warm(path: Path) -> None:
    """Read the file once (into a small buffer) so both converters find it in the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def compare(a: Path, b: Path) -> tuple[int, list[str], list[str]]:
    """(identical tensor count, names that differ, names in only one folder), read one tensor at a time."""
    ta, tb = index_tensors(a), index_tensors(b)
    only = sorted(set(ta) ^ set(tb))
    same, differ = 0, []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.read().view(torch.uint8),
                                                                     y.read().view(torch.uint8)):
            same += 1
        else:
            differ.append(name)
    return same, differ, only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cpmkit-mlx-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each converter (the best time is kept)")
    args = parser.parse_args()
    src = args.workdir / f"minicpm4-0.5b-shape-{args.layers}L"
    config = bench_config(args.layers)
    if not (src / "model.safetensors").is_file():
        print(f"writing {src} ...", file=sys.stderr)
        write_checkpoint(src, config)
    size = (src / "model.safetensors").stat().st_size
    warm(src / "model.safetensors")

    outs = {"cpmkit": args.workdir / "out-cpmkit", "mlx-lm": args.workdir / "out-mlx-lm"}
    commands = {"cpmkit": [sys.executable, "-c", CPMKIT, str(src), str(outs["cpmkit"])],
                "mlx-lm": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                           str(outs["mlx-lm"]), "-q"]}
    results: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            wall, rss = run(cmd, args.workdir)
            best = results.get(name)
            results[name] = (min(wall, best[0]) if best else wall, max(rss, best[1]) if best else rss)
    same, differ, only = compare(outs["cpmkit"], outs["mlx-lm"])

    largest = max(math.prod(s) * 2 for s in read_spec(config).tensor_shapes().values())
    print(f"checkpoint: {args.layers} layers, {size / 2**20:.0f} MiB bf16, largest tensor {largest / 2**20:.0f} MiB")
    for name, (wall, rss) in results.items():
        print(f"{name:>7}: {wall:7.2f} s   peak RSS {rss / 2**20:7.0f} MiB")
    ratio = results["cpmkit"][0] / results["mlx-lm"][0]
    print(f"time ratio cpmkit / mlx-lm: {ratio:.2f}")
    print(f"tensors identical: {same}; differing: {len(differ)} {differ[:5]}; in one folder only: {only[:5]}")


if __name__ == "__main__":
    main()
