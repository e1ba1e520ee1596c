"""Throughput of cpmkit's GGUF quantizers against llama.cpp's own C quantizer, in the same process.

Run by hand:  python bench/gguf_quant_throughput.py [--rows 4608 --cols 1536 --repeat 3 --workers N]

Quantizes one MiniCPM5-1B-shaped float32 tensor with ``cpmkit.convert.gguf.quantize.quantize_tensor`` and
with ``ggml_quantize_chunk`` from llama-cpp-python's libggml-base, and prints MB/s of float32 input:

* on one thread: cpmkit with ``workers=1`` against the C on one thread (one llama-quantize worker);
* on N cores: cpmkit's ``QuantizeWorkers`` with N worker processes (started before the timing, as one
  conversion starts them once) against the C on N threads, each quantizing a slice of rows (ctypes drops
  the GIL for the call), which is how llama-quantize splits a tensor over its threads.

It also checks that the bytes are identical. The best of ``--repeat`` runs counts (the machine is shared);
the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ggml_reference import ggml_quantize  # noqa: E402  (test helper: ctypes binding to libggml-base)

from cpmkit.convert.gguf.quantize import (  # noqa: E402
    QuantizeWorkers,
    default_workers,
    quantize_tensor,
)

TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q3_K", "Q5_K", "Q2_K")


def best_time(fn, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def ggml_threaded(w: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None, threads: int) -> torch.Tensor:
    """The C quantizer on ``threads`` threads, each given a contiguous slice of rows."""
    if threads == 1:
        return ggml_quantize(w, qtype, imatrix)
    bounds = [w.shape[0] * i // threads for i in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda i: ggml_quantize(w[bounds[i] : bounds[i + 1]], qtype, imatrix), range(threads))
        return torch.cat(list(parts))


def pooled(pool: QuantizeWorkers, w: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(list(pool.submit(w, qtype, imatrix))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4608)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="cores of the parallel columns (0: cpmkit's default)")
    ap.add_argument("--imatrix", action="store_true", help="also pass a random importance vector")
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    workers = args.workers or default_workers()

    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols) * 0.02
    imatrix = torch.rand(args.cols) + 0.05 if args.imatrix else None
    megabytes = w.numel() * 4 / 1e6
    print(f"tensor {args.rows}x{args.cols} float32 ({megabytes:.1f} MB), imatrix {imatrix is not None}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'':6s} {'--- one core (MB/s) ---':>27s}   {f'--- {workers} cores (MB/s) ---':>29s}")
    print(f"{'type':6s} {'cpmkit':>8s} {'C':>8s} {'ratio':>7s}   {'cpmkit':>8s} {'C':>8s} {'ratio':>7s}  identical")
    with QuantizeWorkers(workers) as pool:
        for name in args.types.split(","):
            row(name, w, imatrix, pool, workers, megabytes, args.repeat)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def row(name: str, w: torch.Tensor, imatrix: torch.Tensor | None, pool: QuantizeWorkers, workers: int,
        megabytes: float, repeat: int) -> None:
    """One type's line of the table."""
    qtype = QType[name]
    t_ours, ours = best_time(lambda: quantize_tensor(w, qtype, imatrix, workers=1), repeat)
    t_ref, ref = best_time(lambda: ggml_quantize(w, qtype, imatrix), repeat)
    t_ours_n, ours_n = best_time(lambda: pooled(pool, w, qtype, imatrix), repeat)
    t_ref_n, ref_n = best_time(lambda: ggml_threaded(w, qtype, imatrix, workers), repeat)
    same = torch.equal(ours, ref) and torch.equal(ours_n, ref) and torch.equal(ref_n, ref)
    print(f"{name:6s} {megabytes / t_ours:8.1f} {megabytes / t_ref:8.1f} {t_ref / t_ours:7.2f}   "
          f"{megabytes / t_ours_n:8.1f} {megabytes / t_ref_n:8.1f} {t_ref_n / t_ours_n:7.2f}  {same}")


if __name__ == "__main__":
    main()
