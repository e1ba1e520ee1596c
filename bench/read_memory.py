"""Peak memory of reading a checkpoint: ``cpmkit inspect`` and a streaming pass over every tensor, on a
MiniCPM5-1B-shaped random checkpoint (about 2.2 GB of bf16) generated on the fly, tensor by tensor.

Each measurement runs in its own process and reports that process's peak RSS (VmHWM), printed beside
the checkpoint size and the largest tensor: streaming should stay near the largest tensor, not the model.

    python bench/read_memory.py [--workdir /tmp/cpmkit-read-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from cpmkit.formats.safetensors import StreamingWriter
from cpmkit.spec import read_spec
from cpmkit.testing.fixtures import DATA

# MiniCPM5-1B (ARCHITECTURES.md §1.12)
MINICPM5_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1536, "intermediate_size": 4608,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128,
    "vocab_size": 130560, "rms_norm_eps": 1e-06, "rope_theta": 5000000.0, "rope_scaling": None,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
}

# Each measurement runs in a fresh interpreter that prints its own peak RSS (KiB) last. VmHWM belongs to the
# process's own address space; getrusage's ru_maxrss would also count the parent's memory at fork time.
CHILD = """
import contextlib, io, re, sys
from cpmkit.checkpoint import Checkpoint
from cpmkit.cli import cli
if sys.argv[1] == "baseline":
    Checkpoint.open(sys.argv[2])
elif sys.argv[1] == "stream":
    for name, tensor in Checkpoint.open(sys.argv[2]).stream():
        pass
else:
    with contextlib.redirect_stdout(io.StringIO()):
        cli(["inspect", sys.argv[2], "--json"], standalone_mode=False)
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def write_checkpoint(folder: Path) -> None:
    """Random bf16 weights written one tensor at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MINICPM5_1B, indent=2))
    (folder / "tokenizer.json").write_bytes((DATA / "bpe_tokenizer.json").read_bytes())
    shapes = read_spec(MINICPM5_1B).tensor_shapes()
    entries = [(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    with StreamingWriter(folder / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, _, shape in entries:
            writer.write(name, (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16))


def child_peak(mode: str, folder: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one measurement in its own process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], check=True, capture_output=True,
                         text=True).stdout
    return time.perf_counter() - start, int(out.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cpmkit-read-bench"))
    args = parser.parse_args()
    folder = args.workdir / "minicpm5-1b-random"
    sizes = [math.prod(s) * 2 for s in read_spec(MINICPM5_1B).tensor_shapes().values()]
    total, largest = sum(sizes), max(sizes)
    if not (folder / "model.safetensors").is_file():
        print(f"writing {folder} ...", file=sys.stderr)
        write_checkpoint(folder)
    mib = 1 << 20
    print(f"checkpoint: {total / mib:,.0f} MiB bf16, largest tensor {largest / mib:,.0f} MiB")
    _, baseline = child_peak("baseline", folder)
    print(f"{'open only (imports)':<22} peak RSS {baseline / mib:,.0f} MiB")
    for label, mode in (("stream every tensor", "stream"), ("cpmkit inspect --json", "inspect")):
        seconds, peak = child_peak(mode, folder)
        print(f"{label:<22} {seconds:6.1f} s, peak RSS {peak / mib:,.0f} MiB = open + "
              f"{(peak - baseline) / largest:.2f} x largest tensor ({peak / total:.2f} x model)")


if __name__ == "__main__":
    main()
