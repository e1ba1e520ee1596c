"""cpmkit's MLX conversion against ``python -m mlx_lm convert -q`` on the same random checkpoint, on this CPU.

The checkpoint has MiniCPM4-0.5B's layer shapes (hidden 1024, FFN 4096, 16 heads, 2 KV heads, vocabulary
73448) with fewer layers, untied and with plain RoPE, so that mlx-lm's own rules give the same tensors as
ours: no tied-head rewrite, and no LongRoPE config, on which mlx-lm's tokenizer loading crashes under
transformers 5 (MLX.md §3.4). It is written once, tensor by tensor, in bf16.

Each converter runs in its own process (default recipe: 4-bit, group size 64), imports included; reported:
wall time, CPU time (user + system, less noisy than wall time on a shared machine) and peak RSS (GNU time's
%e, %U + %S and %M of that process), the 1-minute load average around the runs, and whether every tensor of
the two folders is identical (dtype, shape and bytes). ``--threads N`` runs cpmkit under
``torch.set_num_threads(N)`` (the library leaves torch's settings alone).

``--parts`` times cpmkit's steps in this process over the checkpoint's quantized tensors instead: reading,
``quantize_affine``, ``pack_codes``, the reader's NaN/Inf check, and ``mx.quantize`` of the same tensors
(mlx's CPU kernel, the reference for speed) when mlx is installed; CPU time counts all threads.

    python bench/mlx_vs_mlxlm.py [--layers 8] [--workdir /tmp/cpmkit-mlx-bench] [--repeat 1] [--threads N]
    python bench/mlx_vs_mlxlm.py --parts [--bits 4] [--group-size 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cpmkit import checkpoint
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.mlx.convert import plan_jobs
from cpmkit.formats import safetensors as st
from cpmkit.formats.mlx.folder import index_tensors
from cpmkit.formats.mlx.pack import pack_codes
from cpmkit.formats.safetensors import StreamingWriter
from cpmkit.quant.affine import quantize_affine
from cpmkit.quant.mlx_recipes import UniformRecipe
from cpmkit.spec import read_spec
from cpmkit.testing import build_checkpoint

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json")
TIME = "/usr/bin/time"  # GNU time: %e wall seconds, %U/%S user/system CPU seconds, %M peak RSS in KiB


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


CPMKIT = ("from pathlib import Path; import sys, torch; from cpmkit.checkpoint import Checkpoint; "
          "from cpmkit.convert.mlx.convert import convert_to_mlx; "
          "torch.set_num_threads(int(sys.argv[3])) if len(sys.argv) > 3 else None; "
          "convert_to_mlx(Checkpoint.open(sys.argv[1]), Path(sys.argv[2]))")


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    cpu: float  # user + system seconds
    rss: int  # peak bytes
    load: tuple[float, float]  # 1-minute load average before and after


def load_average() -> float:
    return os.getloadavg()[0]


def run(cmd: list[str], workdir: Path) -> Run:
    """One child process measured by /usr/bin/time: a child forked from this (torch-importing) process would
    count this process's pages in its ru_maxrss."""
    report = workdir / "time.txt"
    before = load_average()
    proc = subprocess.run([TIME, "-f", "%e %U %S %M", "-o", str(report), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr.decode()[-3000:]}")
    wall, user, system, kib = report.read_text().split()[-4:]
    return Run(float(wall), float(user) + float(system), int(kib) * 1024, (before, load_average()))


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


class Clock:
    """Wall and CPU (all threads of this process) seconds, summed per named step."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def time(self, name: str, fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        total = self.totals.setdefault(name, [0.0, 0.0])
        total[0] += time.perf_counter() - wall
        total[1] += time.process_time() - cpu
        return result


def time_parts(src: Path, bits: int, group_size: int) -> None:
    """cpmkit's per-tensor steps over the checkpoint's quantized tensors, and mx.quantize on the same input.
    Each of the three passes reads the tensors again (from the page cache), so that no step runs while
    another one's thread pool is still spinning."""
    try:
        import mlx.core as mx
    except ImportError:
        mx = None
    ck = Checkpoint.open(src, allow_nonfinite=True)
    jobs = [job for job in plan_jobs(ck.spec, UniformRecipe(bits, group_size)) if job.spec is not None]
    refs = [ck.tensors[job.source] for job in jobs]
    clock = Clock()
    for ref in refs:
        w = clock.time("read", st.read_tensor, ref.file, ref.entry)
        q = clock.time("quantize_affine", quantize_affine, w, bits, group_size)
        clock.time("pack_codes", pack_codes, q.codes, bits)
    for ref in refs:
        clock.time("NaN/Inf check (checkpoint.count_nonfinite)", checkpoint.count_nonfinite,
                   st.read_tensor(ref.file, ref.entry))
    for ref in refs if mx is not None else ():
        a = mx.array(st.read_tensor(ref.file, ref.entry).view(torch.int16).numpy()).view(mx.bfloat16)  # bf16
        mx.eval(a)
        clock.time("mx.quantize (reference)", lambda: mx.eval(mx.quantize(a, group_size=group_size, bits=bits)))
    elements = sum(math.prod(job.shape) for job in jobs)
    print(f"{len(jobs)} quantized tensors, {elements / 1e6:.0f} M weights, {bits}-bit, group size {group_size}, "
          f"torch threads {torch.get_num_threads()}, load average {load_average():.2f}")
    for name, (wall, cpu) in clock.totals.items():
        print(f"{name:>44}: wall {wall:6.2f} s   cpu {cpu:6.2f} s   ({1e9 * cpu / elements:5.2f} ns/weight)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cpmkit-mlx-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each converter (the best time is kept)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in cpmkit's process (or this one)")
    parser.add_argument("--parts", action="store_true", help="time cpmkit's steps in this process instead")
    parser.add_argument("--bits", type=int, default=4, help="with --parts")
    parser.add_argument("--group-size", type=int, default=64, help="with --parts")
    args = parser.parse_args()
    src = args.workdir / f"minicpm4-0.5b-shape-{args.layers}L"
    config = bench_config(args.layers)
    if not (src / "model.safetensors").is_file():
        print(f"writing {src} ...", file=sys.stderr)
        write_checkpoint(src, config)
    size = (src / "model.safetensors").stat().st_size
    warm(src / "model.safetensors")
    if args.parts:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        time_parts(src, args.bits, args.group_size)
        return

    outs = {"cpmkit": args.workdir / "out-cpmkit", "mlx-lm": args.workdir / "out-mlx-lm"}
    threads = [] if args.threads is None else [str(args.threads)]
    commands = {"cpmkit": [sys.executable, "-c", CPMKIT, str(src), str(outs["cpmkit"]), *threads],
                "mlx-lm": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                           str(outs["mlx-lm"]), "-q"]}
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            runs[name].append(run(cmd, args.workdir))
    same, differ, only = compare(outs["cpmkit"], outs["mlx-lm"])

    largest = max(math.prod(s) * 2 for s in read_spec(config).tensor_shapes().values())
    print(f"checkpoint: {args.layers} layers, {size / 2**20:.0f} MiB bf16, largest tensor {largest / 2**20:.0f} MiB")
    best = {name: (min(r.wall for r in rs), min(r.cpu for r in rs)) for name, rs in runs.items()}
    for name, rs in runs.items():
        loads = ", ".join(f"{r.load[0]:.1f}-{r.load[1]:.1f}" for r in rs)
        print(f"{name:>7}: wall {best[name][0]:7.2f} s   cpu {best[name][1]:7.2f} s   "
              f"peak RSS {max(r.rss for r in rs) / 2**20:6.0f} MiB   (best of {len(rs)}; load average {loads})")
    print(f"ratio cpmkit / mlx-lm: wall {best['cpmkit'][0] / best['mlx-lm'][0]:.2f}, "
          f"cpu {best['cpmkit'][1] / best['mlx-lm'][1]:.2f}")
    print(f"tensors identical: {same}; differing: {len(differ)} {differ[:5]}; in one folder only: {only[:5]}")


if __name__ == "__main__":
    main()
