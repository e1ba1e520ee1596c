"""Throughput of cpmkit's GGUF quantizers against llama.cpp's own C quantizer, in the same process.

Run by hand:  python bench/gguf_quant_throughput.py [--rows 4608 --cols 1536 --repeat 3 --threads N]

Quantizes one MiniCPM5-1B-shaped float32 tensor with ``cpmkit.convert.gguf_quantize.quantize_tensor`` and
with ``ggml_quantize_chunk`` from llama-cpp-python's libggml-base (single-threaded C, as one
llama-quantize worker), prints MB/s of float32 input for both and the ratio ours / C, and checks that
the bytes are identical. The best of ``--repeat`` runs counts (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as QType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ggml_reference import ggml_quantize  # noqa: E402  (test helper: ctypes binding to libggml-base)

from cpmkit.convert.gguf_quantize import quantize_tensor  # noqa: E402

TYPES = ("Q4_K", "Q6_K", "Q8_0")


def best_time(fn, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4608)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--imatrix", action="store_true", help="also pass a random importance vector")
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols) * 0.02
    imatrix = torch.rand(args.cols) + 0.05 if args.imatrix else None
    megabytes = w.numel() * 4 / 1e6
    print(f"tensor {args.rows}x{args.cols} float32 ({megabytes:.1f} MB), torch threads "
          f"{torch.get_num_threads()}, imatrix {imatrix is not None}")
    print(f"{'type':6s} {'cpmkit MB/s':>12s} {'llama.cpp MB/s':>15s} {'ratio':>7s}  identical")
    for name in args.types.split(","):
        qtype = QType[name]
        t_ours, ours = best_time(lambda: quantize_tensor(w, qtype, imatrix), args.repeat)
        t_ref, ref = best_time(lambda: ggml_quantize(w, qtype, imatrix), args.repeat)
        print(f"{name:6s} {megabytes / t_ours:12.1f} {megabytes / t_ref:15.1f} {t_ref / t_ours:7.2f}  "
              f"{torch.equal(ours, ref)}")


if __name__ == "__main__":
    main()
