"""What gptq_quality.py and awq_quality.py share: the demo model scored without test-set leakage, every artifact by
the same ``cpmkit verify``, and llm-compressor run in its own venv on a Granite twin of the demo.

The demo model was trained on the first 1,000,000 characters of ../shared/corpus/tinyshakespeare.txt;
calibration draws 128 x 512-token windows of that training text (cpmkit's seeded draw, BOS first; the same
windows for llm-compressor) and every artifact is scored on the held-out rest (115k characters, ctx 512).
llm-compressor writes compressed-tensors for the Granite twin (same tensors; Granite's multipliers are MiniCPM's
muP), and its folder gets the demo's MiniCPM config back so cpmkit verifies it like its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


def cpmkit(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cpmkit.cli import main; main()", *args]


@dataclass
class Row:
    label: str
    seconds: float
    peak_gib: float
    report: dict


class DemoBench:
    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        text = CORPUS.read_text(encoding="utf-8")
        self.calib, self.held_out = work / "calib.txt", work / "heldout.txt"
        self.calib.write_text(text[:TRAINED_CHARS], encoding="utf-8")
        self.held_out.write_text(text[TRAINED_CHARS:], encoding="utf-8")
        self.cache = work / "reference-cache"
        self.rows: list[Row] = []

    def folder(self, label: str) -> Path:
        return self.work / re.sub(r"[^\w.-]+", "_", label)

    def verify(self, artifact: Path) -> dict:
        done = subprocess.run(cpmkit("verify", str(artifact), "--reference", str(DEMO), "--text", str(self.held_out),
                                     "--no-speed", "--json", "--cache-dir", str(self.cache)),
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    def cpmkit_row(self, label: str, convert_args: list[str], calibrated: bool) -> None:
        out = self.folder(label)
        extra = ["--calib", str(self.calib), "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN)] if calibrated else []
        seconds, peak = run_measured(cpmkit("convert", str(DEMO), str(out), *convert_args, *extra, "--overwrite"),
                                     stdout=subprocess.DEVNULL)
        self._add(label, seconds, peak, out)

    def llmcompressor_row(self, python: str, script: str, label: str, args: list[str]) -> None:
        """Run ``bench/<script> TWIN TOKENS OUT *args`` with llm-compressor's python."""
        tokens = self.work / "calibration-tokens.pt"
        if not tokens.is_file():
            torch.save(Calibration(self.calib, None, NSAMPLES, SEQLEN).tokens(Checkpoint.open(DEMO)), tokens)
        twin = write_granite_twin(DEMO, self.work / "granite-twin")
        out = self.folder(label)
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak = run_measured([python, str(ROOT / "bench" / script), str(twin), str(tokens), str(out), *args],
                                     stdout=subprocess.DEVNULL)
        quantization = json.loads((out / "config.json").read_text())["quantization_config"]
        config = json.loads((DEMO / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))
        self._add(label, seconds, peak, out)

    def _add(self, label: str, seconds: float, peak: float, out: Path) -> None:
        self.rows.append(Row(label, seconds, peak, self.verify(out)))
        print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)

    def print_table(self) -> None:
        first = self.rows[0].report
        print(f"reference PPL {first['reference_metrics']['ppl']:.3f} on {first['evaluation']['scored_tokens']} "
              f"held-out tokens; calibration {NSAMPLES} x {SEQLEN} tokens of the training text\n")
        print("| artifact | quantize s | peak GiB | bits/weight | PPL | dPPL % | KLD mean | KLD p99 | top-1 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in self.rows:
            a = row.report["artifacts"][0]
            print(f"| {row.label} | {row.seconds:.1f} | {row.peak_gib:.2f} | {a['bits_per_weight']:.2f} | "
                  f"{a['ppl']:.3f} | {a['delta_ppl_pct']:+.2f} | {a['kld']['mean']:.5f} | {a['kld']['p99']:.4f} | "
                  f"{a['top1_agreement']:.4f} |")
