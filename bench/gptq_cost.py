"""GPTQ's (or AWQ's) cost on CPU at real widths: wall time, peak memory (PSS of the process tree) and time per
decoder block of ``cpmkit convert --to gptq:4bit-g128`` (``--to awq:4bit-g128``) on random checkpoints shaped like
MiniCPM4-8B (4 of its 32 layers) and MiniCPM-1B, so a full run can be predicted: per-block time x layers
(calibration forwards grow with samples x seqlen; the GPTQ solves do not).

    python bench/gptq_cost.py [--work /tmp/cpmkit-bench-verify] [--shapes 8b-4l 1b] [--to awq:4bit-g128]
                              [--nsamples 4] [--seqlen 512]

Shares the checkpoints of verify_memory.py (generated under --work when missing).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from procmem import run_measured
from random_checkpoint import write_random_checkpoint
from verify_memory import SHAPES, cpmkit

BLOCK_LINE = re.compile(r"block (\d+): \d+ linears (?:scaled, )?(?:clipped and )?quantized in ([\d.]+) s")


def measure(work: Path, name: str, target: str, nsamples: int, seqlen: int) -> None:
    variant, shape = SHAPES[name]
    ck = write_random_checkpoint(work / name, variant, shape)
    out = work / f"{name}-{target.replace(':', '-')}"
    log = out.with_name(out.name + ".log")
    with open(log, "w") as err:
        seconds, peak = run_measured(cpmkit("convert", str(ck), str(out), "--to", target, "--nsamples",
                                            str(nsamples), "--seqlen", str(seqlen), "--overwrite"),
                                     stdout=subprocess.DEVNULL, stderr=err)
    blocks = [float(m[2]) for m in BLOCK_LINE.finditer(log.read_text())]
    params = sum(os.path.getsize(f) for f in ck.glob("*.safetensors")) / 2 / 1e9  # bf16
    per_block = sum(blocks) / len(blocks)
    print(f"{name} {target}: {params:.2f} B parameters, {len(blocks)} blocks, {nsamples} x {seqlen} tokens: "
          f"{seconds:.0f} s, {per_block:.1f} s per block (min {min(blocks):.1f}, max {max(blocks):.1f}), peak {peak:.2f} GiB",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-verify"))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["8b-4l", "1b"])
    ap.add_argument("--to", default="gptq:4bit-g128", help="the calibrated target (awq:4bit-g128 for AWQ's cost)")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    for name in args.shapes:
        measure(args.work, name, args.to, args.nsamples, args.seqlen)


if __name__ == "__main__":
    main()
