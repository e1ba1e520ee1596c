"""Calibration for GPTQ (and AWQ): samples from a text, and the block visitor that quantizes each decoder block
with GPTQ in true-sequential order while the layer-streamed runner holds it.

Samples: ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets in the calibration text (a file, or
the built-in calibration text), BOS first, run through the checkpoint's own forward (muP scalings, LongRoPE,
MLA, MoE routing) block by block, up to ``FORWARD_TOKENS`` tokens to a forward. For each block the visitor goes
stage by stage (``cpmkit.models.stages``: q/k/v, then o, then gate/up, then down; MLA's latent projections
first; MoE experts per projection): it runs the block over every sample with hooks that sum each stage
linear's Hessian (a MoE expert's from the tokens routed to it; each forward stops once the stage's linears have
their inputs), quantizes the stage, and puts the dequantized weights in place, so the next stage sees the
inputs the quantized ones produce; the block's outputs, computed after all stages, feed the next block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cpmkit.checkpoint import Checkpoint
from cpmkit.models.streamed import BlockPass
from cpmkit.models.text import calibration_text
from cpmkit.models.windows import calibration_windows
from cpmkit.quant.gptq import GPTQResult, GPTQSpec, Hessian, gptq_quantize
from cpmkit.quant.groups import GroupQuantized
from cpmkit.quant.ternary import ternary_as_groups
from cpmkit.tokenizer import Tokenizer

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 512
SEED = 0
FORWARD_TOKENS = 4096  # calibration tokens per block forward: whole samples, batched up to this many


def forward_batch(seqlen: int) -> int:
    return max(1, FORWARD_TOKENS // seqlen)


@dataclass(frozen=True)
class Calibration:
    """Where the samples come from: a text file, a named dataset's train split, or (both None) the built-in
    calibration text; ``nsamples`` windows of ``seqlen`` tokens."""

    text: str | Path | None = None
    dataset: str | None = None
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN

    @property
    def source(self) -> str:
        return f"dataset:{self.dataset}" if self.dataset else str(self.text or "builtin")

    def tokens(self, ck: Checkpoint) -> torch.Tensor:
        """``[nsamples, seqlen]`` token ids, BOS first when the tokenizer adds one."""
        tok = Tokenizer(ck.root, ck.config)
        ids = tok.encode(calibration_text(self.text, self.dataset))
        bos = tok.special.bos_id if tok.special.add_bos else None
        return calibration_windows(ids, self.nsamples, self.seqlen, bos, SEED)


@dataclass(frozen=True)
class LayerLog:
    """One quantized linear, as the log beside the artifact records it."""

    name: str
    loss: float
    damp: float
    seconds: float
    dead_columns: int
    tokens: int
    method: str = "gptq"  # or "ternary-exact": a ternary weight encoded on the grid with no error

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "method": self.method, "loss": self.loss, "damp": self.damp,
                "seconds": round(self.seconds, 3), "dead_columns": self.dead_columns, "tokens": self.tokens}


class GPTQBlocks:
    """The block visitor (``StreamedRunner.calibrate``): each block quantized stage by stage; ``on_block(i,
    results)`` receives block i's quantized linears (names relative to the block) as soon as it is done. With
    ``exact_ternary``, a linear that is ternary with one scale per group (BitCPM) is encoded on the grid exactly
    instead of quantized."""

    def __init__(self, spec: GPTQSpec, stages: list[list[str]],
                 on_block: Callable[[int, dict[str, GroupQuantized]], None], log: Callable[[str], None],
                 exact_ternary: bool = True):
        self.spec, self.stages, self.on_block, self.log = spec, stages, on_block, log
        self.exact_ternary = exact_ternary
        self.layers: list[LayerLog] = []

    def visit(self, index: int, block: nn.Module, run: BlockPass) -> None:
        results: dict[str, GroupQuantized] = {}
        start = time.perf_counter()
        for stage in self.stages:
            todo = []
            for name in stage:  # exact ternary weights need no calibration: no Hessian, no pass for them
                exact = self._exact(block.get_submodule(name).weight)
                if exact is None:
                    todo.append(name)
                    continue
                results[name] = exact
                self.layers.append(LayerLog(f"model.layers.{index}.{name}", 0.0, 0.0, 0.0, 0, 0, "ternary-exact"))
            if not todo:
                continue
            hessians = {name: Hessian(block.get_submodule(name).in_features) for name in todo}
            run({name: h.add for name, h in hessians.items()})
            for name in todo:
                module = block.get_submodule(name)
                full = f"model.layers.{index}.{name}"
                tokens = hessians[name].tokens
                if tokens == 0:  # an expert no calibration token was routed to: plain rounding
                    self.log(f"{full}: no calibration token reached it; quantized to nearest")
                    hessians[name].add(torch.eye(module.in_features))
                # popped and passed without a name: gptq_quantize consumes the Hessian, and frees it as it goes
                result = gptq_quantize(module.weight, hessians.pop(name).value(), self.spec, full)
                module.weight = nn.Parameter(result.quantized.dequantize().to(module.weight.device),
                                             requires_grad=False)
                results[name] = result.quantized
                self._record(full, result, tokens)
            del hessians
        self.on_block(index, results)
        worst = max(self.layers[-len(results):], key=lambda entry: entry.loss)
        self.log(f"block {index}: {len(results)} linears quantized in {time.perf_counter() - start:.1f} s "
                 f"(largest loss {worst.loss:.4g}, {worst.name})")

    def _exact(self, weight: torch.Tensor) -> GroupQuantized | None:
        return ternary_as_groups(weight, self.spec.group) if self.exact_ternary else None

    def _record(self, name: str, result: GPTQResult, tokens: int) -> None:
        self.layers.append(LayerLog(name, result.loss, result.damp, result.seconds, result.dead_columns, tokens))
        if result.damp > self.spec.damp:
            self.log(f"{name}: the Hessian needed damping {result.damp:.2f} (asked {self.spec.damp:.2f})")
