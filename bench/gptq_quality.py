"""GPTQ quality and cost: cpmkit's GPTQ against llm-compressor's GPTQModifier and against round-to-nearest, on
the demo model with no test-set leakage, every artifact scored by the same ``cpmkit verify``.

The demo model was trained on the first 1,000,000 characters of ../shared/corpus/tinyshakespeare.txt; both
quantizers calibrate on windows of that training text (the same 128 x 512 token windows, cpmkit's seeded
draw, BOS first) and every artifact is scored on the held-out rest (115k characters, ctx 512). llm-compressor
runs on a Granite twin of the demo (same tensors; Granite's multipliers are MiniCPM's muP), writes
compressed-tensors, and its folder is given the demo's MiniCPM config back so cpmkit verifies it like its own.
Round-to-nearest rows: GPTQ's own layout with ``--rtn`` (the same bits and groups; what llm-compressor's
QuantizationModifier does), GGUF Q4_0 (symmetric, 32 weights per scale) and MLX 4- and 3-bit g64 (affine).

    python bench/gptq_quality.py --llmcompressor-python /path/to/venv/bin/python [--work /tmp/cpmkit-bench-gptq]

Without --llmcompressor-python only cpmkit's rows are measured. Prints a markdown table: quantize wall time
and peak memory (PSS of the process tree), bits per weight, perplexity and its change, mean KLD, top-1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from procmem import run_measured

from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gptq.calibrate import Calibration
from cpmkit.testing.twins import write_granite_twin

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt"
DEMO = ROOT / "cpmkit" / "demo" / "model"
TRAINED_CHARS = 1_000_000
NSAMPLES, SEQLEN = 128, 512

CPMKIT_TARGETS = [  # (row label, convert arguments)
    ("RTN gguf:Q4_0", ["--to", "gguf:Q4_0"]),
    ("RTN mlx:4bit-g64", ["--to", "mlx:4bit-g64"]),
    ("RTN mlx:3bit-g64", ["--to", "mlx:3bit-g64"]),
    ("RTN gptq:4bit-g128", ["--to", "gptq:4bit-g128", "--rtn"]),
    ("RTN gptq:3bit-g128", ["--to", "gptq:3bit-g128", "--rtn"]),
    ("cpmkit gptq:4bit-g128 (order static)", ["--to", "gptq:4bit-g128"]),
    ("cpmkit gptq:4bit-g128 --order none", ["--to", "gptq:4bit-g128", "--order", "none"]),
    ("cpmkit gptq:4bit-g128 --order desc", ["--to", "gptq:4bit-g128", "--order", "desc"]),
    ("cpmkit gptq:3bit-g128 (order static)", ["--to", "gptq:3bit-g128"]),
    ("cpmkit gptq:3bit-g128 --order none", ["--to", "gptq:3bit-g128", "--order", "none"]),
]
LLMCOMPRESSOR_TARGETS = [  # (row label, bits, actorder)
    ("llm-compressor 4bit-g128 (actorder static)", 4, "static"),
    ("llm-compressor 4bit-g128 actorder none", 4, "none"),
    ("llm-compressor 3bit-g128 (actorder static)", 3, "static"),
    ("llm-compressor 3bit-g128 actorder none", 3, "none"),
]


def cpmkit(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cpmkit.cli import main; main()", *args]


def verify(artifact: Path, eval_text: Path, cache: Path) -> dict:
    done = subprocess.run(cpmkit("verify", str(artifact), "--reference", str(DEMO), "--text", str(eval_text),
                                 "--no-speed", "--json", "--cache-dir", str(cache)),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def llmcompressor_folder(python: str, twin: Path, tokens: Path, out: Path, bits: int, actorder: str) -> tuple[float, float]:
    """Run llm-compressor into ``out`` and give the folder the demo's MiniCPM config back."""
    shutil.rmtree(out, ignore_errors=True)
    measured = run_measured([python, str(ROOT / "bench" / "llmcompressor_gptq.py"), str(twin), str(tokens), str(out),
                             "--bits", str(bits), "--actorder", actorder], stdout=subprocess.DEVNULL)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    config = json.loads((DEMO / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-gptq"))
    parser.add_argument("--llmcompressor-python", help="python of a venv with llm-compressor installed")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text = CORPUS.read_text(encoding="utf-8")
    calib, held_out = work / "calib.txt", work / "heldout.txt"
    calib.write_text(text[:TRAINED_CHARS], encoding="utf-8")
    held_out.write_text(text[TRAINED_CHARS:], encoding="utf-8")
    cache = work / "reference-cache"

    rows = []  # (label, seconds, peak GiB, report artifact)
    for label, convert_args in CPMKIT_TARGETS:
        out = work / re.sub(r"[^\w.-]+", "_", label)
        calibrated = label.startswith("cpmkit")
        extra = ["--calib", str(calib), "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN)] if calibrated else []
        seconds, peak = run_measured(cpmkit("convert", str(DEMO), str(out), *convert_args, *extra, "--overwrite"),
                                     stdout=subprocess.DEVNULL)
        rows.append((label, seconds, peak, verify(out, held_out, cache)))
        print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)

    if args.llmcompressor_python:
        tokens = work / "calibration-tokens.pt"
        torch.save(Calibration(calib, None, NSAMPLES, SEQLEN).tokens(Checkpoint.open(DEMO)), tokens)
        twin = write_granite_twin(DEMO, work / "granite-twin")
        for label, bits, actorder in LLMCOMPRESSOR_TARGETS:
            out = work / re.sub(r"[^\w.-]+", "_", label)
            seconds, peak = llmcompressor_folder(args.llmcompressor_python, twin, tokens, out, bits, actorder)
            rows.append((label, seconds, peak, verify(out, held_out, cache)))
            print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)

    reference = rows[0][3]["reference_metrics"]
    evaluation = rows[0][3]["evaluation"]
    print(f"reference PPL {reference['ppl']:.3f} on {evaluation.get('scored_tokens', '?')} held-out tokens; "
          f"calibration {NSAMPLES} x {SEQLEN} tokens of the training text\n")
    print("| artifact | quantize s | peak GiB | bits/weight | PPL | dPPL % | KLD mean | KLD p99 | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, seconds, peak, report in rows:
        a = report["artifacts"][0]
        print(f"| {label} | {seconds:.1f} | {peak:.2f} | {a['bits_per_weight']:.2f} | {a['ppl']:.3f} | "
              f"{a['delta_ppl_pct']:+.2f} | {a['kld']['mean']:.5f} | {a['kld']['p99']:.4f} | "
              f"{a['top1_agreement']:.4f} |")


if __name__ == "__main__":
    main()
