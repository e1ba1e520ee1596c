"""A real GPTQ and AWQ loader on cpmkit's bytes: GPTQModel 7 (in a venv of its own: it wants torch 2.14.1) loads
cpmkit's GPTQ and AWQ folders of the demo model and its weights and logits are compared with cpmkit's own reading
of the same folder.

GPTQModel has no MiniCPM definition that runs without the checkpoint's remote code, so each folder is handed
to it as a Granite twin (``cpmkit.testing.twins``: the same tensors, MiniCPM's muP as Granite's multipliers,
the quantization_config kept). Both sides run in float32 on CPU.

    python bench/gptqmodel_loads.py --gptqmodel-python /path/to/venv/bin/python [--work /tmp/cpmkit-bench-gptqmodel]

Prints, per variant, how far GPTQModel's dequantized weights are from cpmkit's (largest difference relative to
the layer's largest weight: GPTQModel dequantizes in float16, so about 1e-3 is rounding and anything from a
wrong code, zero or group would be of order 1), and the mean KLD and top-1 agreement of the logits (GPTQModel in
float16, cpmkit in float32) over 4 x 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cpmkit.checkpoint import Checkpoint, demo_path
from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
from cpmkit.convert.registry import FORMATS
from cpmkit.testing.twins import write_granite_twin

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [("gptq:4bit-g128", {}), ("gptq:4bit-g128", {"asym": True}), ("gptq:3bit-g128", {}),
           ("gptq:8bit-g64", {"order": "desc"}), ("gptq:2bit-g64", {"asym": True}), ("awq:4bit-g128", {}),
           ("awq:4bit-g64", {})]  # AutoAWQ's GEMV layout: GPTQModel runs it on CUDA only
BACKENDS = {"gptq": "gptq_torch", "awq": "awq_torch"}


def twin(folder: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    write_granite_twin(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = json.loads((folder / "config.json").read_text())["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (folder / "quantize_config.json").is_file():
        shutil.copyfile(folder / "quantize_config.json", out / "quantize_config.json")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptqmodel-python", required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-gptqmodel"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ck = Checkpoint.open(demo_path())
    ids = torch.randint(3, ck.spec.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    torch.save(ids, args.work / "ids.pt")
    print("| variant | linears | weights: max rel. diff | logits: mean KLD | top-1 agreement |\n|---|---|---|---|---|")
    for text, options in TARGETS:
        target = parse_target(text, {"nsamples": 16, "seqlen": 256, **options})
        plugin = FORMATS[target.format]
        name = f"{target.format}-{target.variant}"
        folder = plugin.convert(ck, target, args.work / name, ConvertContext(overwrite=True))
        model = plugin.open(folder, ck.spec, LoadOptions()).load()
        with torch.no_grad():
            ours = model(ids).float()
        out = args.work / f"{name}-gptqmodel.pt"
        with open(args.work / "gptqmodel.log", "a") as log:
            subprocess.run([args.gptqmodel_python, str(ROOT / "bench" / "gptqmodel_logits.py"),
                            str(twin(folder, args.work / f"{name}-granite")), str(args.work / "ids.pt"),
                            str(out), "--backend", BACKENDS[target.format]], check=True, stdout=subprocess.DEVNULL,
                           stderr=log)
        got = torch.load(out, weights_only=True)
        theirs = got["logits"]
        worst = 0.0
        for name, w in got["weights"].items():
            mine = model.get_submodule(name).dequantize().float()
            w = w.T  # GPTQModel returns [in, out]
            worst = max(worst, float((w - mine).abs().max() / mine.abs().max()))
        p, q = ours.log_softmax(-1), theirs.log_softmax(-1)
        kld = float((p.exp() * (p - q)).sum(-1).mean())
        top1 = float((ours.argmax(-1) == theirs.argmax(-1)).double().mean())
        print(f"| {target.name} | {len(got['weights'])} | {worst:.1e} | {kld:.1e} | {top1:.4f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
