"""Peak memory and time of ``cpmkit verify`` on CPU for a MiniCPM4-8B-shaped model beside a 1B-shaped one: the
layer-streamed runner keeps one block in memory, so the 8B shape must verify on a 24 GB machine, in at most
4 GiB, and its peak must stay flat in depth.

Run by hand (heavy: the 8B shape is a 16 GB bf16 checkpoint, generated once under --work, then converted to
GGUF Q4_K_M, about 4.6 GB):

    python bench/verify_memory.py [--work /tmp/cpmkit-bench-verify] [--shapes 8b 8b-4l 1b] [--windows 3]

Per shape: the random bf16 checkpoint (written tensor by tensor), ``cpmkit convert --to gguf:Q4_K_M``, then
``cpmkit verify ARTIFACT --reference CHECKPOINT --no-speed --ctx 512 --chunks W`` with a fresh reference cache
(so the reference pass is measured too): wall time, time per window (both passes), and peak PSS of the verify
process. Shapes:

* ``8b``: MiniCPM4-8B (32 layers, hidden 4096, 32/2 heads, ffn 16384, vocab 73448, untied);
* ``8b-4l``: the same widths, 4 layers: the per-layer slope of peak memory is (8b - 8b-4l) / 28;
* ``1b``: MiniCPM-1B (52 layers, hidden 1536, 24/8 heads, ffn 3840, vocab 73440, tied).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from procmem import run_measured
from random_checkpoint import write_random_checkpoint

from cpmkit.testing import longrope_factors

MINICPM4_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2,
               "intermediate_size": 16384, "vocab_size": 73448, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "longrope", "long_factor": longrope_factors(64),
                                "short_factor": longrope_factors(64), "original_max_position_embeddings": 32768}}
SHAPES = {
    "8b": ("minicpm4", MINICPM4_8B),
    "8b-4l": ("minicpm4", {**MINICPM4_8B, "num_hidden_layers": 4}),
    "1b": ("minicpm-1b", {"hidden_size": 1536, "num_hidden_layers": 52, "num_attention_heads": 24,
                          "num_key_value_heads": 8, "intermediate_size": 3840, "vocab_size": 73440}),
}
CTX = 512


def cpmkit(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cpmkit.cli import main; main()", *args]


def measure(work: Path, name: str, windows: int) -> dict[str, float]:
    variant, shape = SHAPES[name]
    ck = write_random_checkpoint(work / name, variant, shape)
    gguf = work / f"{name}-Q4_K_M.gguf"
    if not gguf.is_file():
        seconds, peak = run_measured(cpmkit("convert", str(ck), str(gguf), "--to", "gguf:Q4_K_M"))
        print(f"{name}: convert to Q4_K_M {seconds:.0f} s, peak {peak:.2f} GiB", flush=True)
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    text = Path(__file__).resolve().parents[1] / "cpmkit" / "demo" / "eval.txt"
    seconds, peak = run_measured(cpmkit("verify", str(gguf), "--reference", str(ck), "--no-speed", "--ctx", str(CTX),
                                        "--chunks", str(windows), "--text", str(text), "--cache-dir", str(cache),
                                        "--json"), stdout=open(work / f"{name}-verify.json", "w"))
    size = (ck / "model.safetensors").stat().st_size / 2**30
    print(f"{name}: checkpoint {size:.2f} GiB, verify {seconds:.0f} s ({seconds / windows:.0f} s per window, both "
          f"passes), peak {peak:.2f} GiB", flush=True)
    return {"seconds": seconds, "peak": peak, "layers": shape["num_hidden_layers"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-verify"))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["1b", "8b-4l", "8b"])
    ap.add_argument("--windows", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}, {args.windows} windows of {CTX}", flush=True)
    results = {name: measure(args.work, name, args.windows) for name in args.shapes}
    if "8b" in results and "8b-4l" in results:
        slope = (results["8b"]["peak"] - results["8b-4l"]["peak"]) / (32 - 4) * 1024
        print(f"per-layer slope of peak memory (8B widths): {slope:+.1f} MiB per layer")
    if "8b" in results and "1b" in results:
        print(f"8B peak / 1B peak: {results['8b']['peak'] / results['1b']['peak']:.2f} (target <= 1.3); "
              f"8B peak {results['8b']['peak']:.2f} GiB (target <= 4)")


if __name__ == "__main__":
    main()
