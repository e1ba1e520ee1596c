"""cpmkit's one-pass HF -> Q4_K_M GGUF against llama.cpp's two steps, on a MiniCPM5-1B-shaped checkpoint.

Run by hand (heavy: a ~2.2 GB bf16 checkpoint is generated once under --work):

    python bench/gguf_vs_llamacpp.py [--work /tmp/cpmkit-bench-gguf] [--layers 24] [--vocab 130560] [--type Q4_K_M]

Each step runs in its own process, timed (wall), with the peak memory (PSS) of that process and the\nworker processes it starts:

* cpmkit: ``convert_to_gguf(checkpoint, Q4_K_M)``, one streaming pass;
* llama.cpp: cpmkit's BF16 GGUF write (byte-identical to ``convert_hf_to_gguf.py --outtype bf16``, see
  tests/test_gguf_convert.py) then ``llama_cpp.llama_model_quantize`` to Q4_K_M (llama-quantize's
  library call, all cores).

It prints both, the ratio, whether the two Q4_K_M files are byte-identical, and then the per-type
quantizer throughput of bench/gguf_quant_throughput.py on one MiniCPM5-1B FFN matrix. ``--layers`` and
``--vocab`` shrink the model (same widths) when the full run would take too long.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import torch
from procmem import run_measured
from random_checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# MiniCPM5-1B (../shared/minicpm/ARCHITECTURES.md §1.12): 24 layers, hidden 1536, 16/2 heads x 128, ffn 4608,
# vocab 130560, untied head
MINICPM5_1B = {"hidden_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 2,
               "head_dim": 128, "intermediate_size": 4608, "vocab_size": 130560}


def make_checkpoint(folder: Path, layers: int, vocab: int) -> Path:
    """MiniCPM5-1B-shaped random bf16 weights with the fixture tokenizer."""
    return write_random_checkpoint(folder, "minicpm5", {**MINICPM5_1B, "num_hidden_layers": layers,
                                                        "vocab_size": vocab})


def timed(args: list[str]) -> tuple[float, float]:
    """Run this script with ``args`` in a child process: (wall seconds, peak memory in GiB of the child and
    all its descendants together)."""
    return run_measured([sys.executable, __file__, *args])


def step_convert(checkpoint: Path, out: Path, file_type: str) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.convert.gguf.convert import convert_to_gguf

    convert_to_gguf(Checkpoint.open(checkpoint), out, file_type=file_type, overwrite=True)


def step_quantize(src: Path, out: Path, file_type: str) -> None:
    import ctypes

    import llama_cpp

    from cpmkit.convert.gguf.convert import file_type_named

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type_named(file_type).llama_file_type)
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-gguf"))
    ap.add_argument("--layers", type=int, default=MINICPM5_1B["num_hidden_layers"])
    ap.add_argument("--vocab", type=int, default=MINICPM5_1B["vocab_size"])
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--step", nargs=3, metavar=("STEP", "SRC", "OUT"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.step:
        step, src, out = args.step
        {"convert": step_convert, "quantize": step_quantize}[step](Path(src), Path(out), args.type)
        return

    ck = make_checkpoint(args.work / f"minicpm5-1b-{args.layers}l-{args.vocab}v", args.layers, args.vocab)
    size_gb = (ck / "model.safetensors").stat().st_size / 2**30
    print(f"checkpoint {ck}: {size_gb:.2f} GiB bf16, {args.layers} layers, vocab {args.vocab}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}")
    ours, bf16, theirs = (args.work / f"{n}.gguf" for n in ("cpmkit-" + args.type, "cpmkit-bf16", "llama-" + args.type))
    t_ours, mem_ours = timed(["--type", args.type, "--step", "convert", str(ck), str(ours)])
    t_bf16, mem_bf16 = timed(["--type", "BF16", "--step", "convert", str(ck), str(bf16)])
    t_quant, mem_quant = timed(["--type", args.type, "--step", "quantize", str(bf16), str(theirs)])
    print(f"cpmkit one pass  HF -> {args.type}: {t_ours:8.1f} s, peak memory {mem_ours:5.2f} GiB")
    print(f"llama.cpp path   HF -> BF16 (cpmkit): {t_bf16:8.1f} s, peak memory {mem_bf16:5.2f} GiB")
    print(f"                 BF16 -> {args.type} (llama_model_quantize): {t_quant:8.1f} s, "
          f"peak memory {mem_quant:5.2f} GiB")
    print(f"time ratio cpmkit / llama.cpp path: {t_ours / (t_bf16 + t_quant):.2f} "
          f"(target <= 1); peak memory {mem_ours / size_gb:.0%} of the checkpoint size")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.type} files byte-identical: {filecmp.cmp(ours, theirs, shallow=False)}")
    subprocess.run([sys.executable, str(ROOT / "bench" / "gguf_quant_throughput.py"), "--repeat", "2",
                    "--rows", str(MINICPM5_1B["intermediate_size"]), "--cols", str(MINICPM5_1B["hidden_size"])],
                   check=True)


if __name__ == "__main__":
    main()
