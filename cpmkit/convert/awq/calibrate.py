"""The AWQ block visitor: per decoder block, one pass over the calibration samples captures each scaling
group's input (the input of the module its loss is measured on: attention, MLP, or the linear), the scales of
every group are searched on the unmodified block (as AutoAWQ does), then applied (the inverse folded into the
norm or linear before), the weights clipped (with ``clip``), and every linear rounded to the asymmetric group
grid. The block then holds the dequantized weights, so the next block sees the quantized block's outputs.

Captured inputs are kept for the search up to ``SEARCH_BYTES`` per group (whole samples; ``x_mean`` always
counts every token): all 128 x 512 samples for inputs up to 4096 wide, 16,384 tokens of an 8B model's
16,384-wide down_proj input.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from cpmkit.models.stages import ScaleGroup
from cpmkit.models.streamed import BlockPass
from cpmkit.quant.awq import AWQSpec, apply_clip, clips, search_clip, search_scale
from cpmkit.quant.groups import GroupQuantized, round_to_nearest

SEARCH_BYTES = 1 << 30
FORWARD_TOKENS = 4096  # tokens per forward of an inspected module during the search


class _Inputs:
    """One group's captured inputs: ``x_abs_sum`` over every token, and whole samples up to the byte budget."""

    def __init__(self) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        self.kept: list[torch.Tensor] = []
        self.kept_bytes = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        total = flat.abs().sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.tokens += flat.shape[0]
        for sample in x.detach().float().split(1):
            if self.kept_bytes + sample.numel() * 4 > SEARCH_BYTES and self.kept:
                return
            self.kept.append(sample)
            self.kept_bytes += sample.numel() * 4

    @property
    def x_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class AWQBlocks:
    """``on_block(i, quantized, changed)``: block i's quantized linears and the other tensors AWQ changed
    (norm weights that took an inverse scale), names relative to the block."""

    def __init__(self, spec: AWQSpec, groups: list[ScaleGroup], linears: list[str],
                 on_block: Callable[[int, dict[str, GroupQuantized], dict[str, torch.Tensor]], None],
                 log: Callable[[str], None]):
        self.spec, self.groups, self.linears, self.on_block, self.log = spec, groups, linears, on_block, log
        self.layers: list[dict[str, object]] = []

    def visit(self, index: int, block: nn.Module, run: BlockPass) -> None:
        start = time.perf_counter()
        for name in self.linears:  # search and fold in float32; the stored dtype comes back at quantization
            module = block.get_submodule(name)
            module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=False)
        inputs = {g.inspect: _Inputs() for g in self.groups}
        run({name: captured.add for name, captured in inputs.items()})
        scales = {g: self._search(block, g, inputs[g.inspect], run) for g in self.groups}
        changed = {}
        for group, s in scales.items():
            changed.update(_fold(block, group, s))
        quantized = {}
        for name in self.linears:
            module = block.get_submodule(name)
            w = module.weight.detach()
            group = next((g for g in self.groups if name in g.linears), None)
            if self.spec.clip and clips(name) and group is not None:
                x = torch.cat(inputs[group.inspect].kept).reshape(-1, w.shape[1]) / scales[group]
                w = apply_clip(w, search_clip(w, x, self.spec.group), self.spec.group)
            q = round_to_nearest(w, self.spec.group, f"model.layers.{index}.{name}")
            quantized[name] = q
            module.weight = nn.Parameter(q.dequantize(), requires_grad=False)
        self.on_block(index, quantized, changed)
        clipped = "clipped and " if self.spec.clip else ""
        self.log(f"block {index}: {len(quantized)} linears scaled, {clipped}quantized in "
                 f"{time.perf_counter() - start:.1f} s")

    def _search(self, block: nn.Module, group: ScaleGroup, captured: _Inputs, run: BlockPass) -> torch.Tensor:
        modules = [block.get_submodule(n) for n in group.linears]
        originals = [m.weight.detach().clone() for m in modules]
        inspect = block.get_submodule(group.inspect)
        attention = group.inspect.endswith("self_attn")
        samples = torch.cat(captured.kept)
        per_forward = max(1, FORWARD_TOKENS // samples.shape[1])

        def forward() -> list[torch.Tensor]:
            with torch.no_grad():
                return [inspect(chunk, run.cos, run.sin, None) if attention else inspect(chunk)
                        for chunk in samples.split(per_forward)]

        reference = forward()

        def set_weights(ws: list[torch.Tensor]) -> None:
            for m, w in zip(modules, ws):
                m.weight = nn.Parameter(w, requires_grad=False)

        def output_error() -> float:
            total = sum(float((a - b).double().pow(2).sum()) for a, b in zip(forward(), reference))
            return total / sum(r.numel() for r in reference)

        result = search_scale(captured.x_mean, originals, set_weights, output_error, self.spec)
        self.layers.append({"group": f"{group.previous} -> {', '.join(group.linears)}", "ratio": result.ratio,
                            "loss": result.loss, "loss_unscaled": result.loss_unscaled})
        return result.scales


def _fold(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Divide the scale out of what produces the group's input and multiply it into the group's linears;
    returns the changed tensors that are not quantized (norm weights)."""
    previous = block.get_submodule(group.previous)
    for name in group.linears:
        module = block.get_submodule(name)
        module.weight = nn.Parameter(module.weight.detach() * s, requires_grad=False)
    if isinstance(previous, nn.Module) and hasattr(previous, "in_features"):  # a linear: its output rows
        w = previous.weight.detach().clone()
        w[-s.numel():] = w[-s.numel():] / s[:, None]
        previous.weight = nn.Parameter(w, requires_grad=False)
        return {}
    weight = previous.weight.detach()
    previous.weight = nn.Parameter((weight.float() / s).to(weight.dtype), requires_grad=False)
    return {f"{group.previous}.weight": previous.weight.detach()}
