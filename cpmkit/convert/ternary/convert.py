"""Checkpoint in, ternary pack out (``cpmkit.formats.ternary``), streamed one tensor at a time.

Exact (the default): the block linears are read once to find the granularity they all share (per tensor, per
row, or groups of 128/64/32), then each is packed at it and checked to give its values back bit for bit; a
linear that is not ternary, or whose magnitudes differ inside a group, is refused by name. Absmean: BitNet
b1.58's rule makes any checkpoint ternary, per row or per group (lossy, and badly so for a model not trained for
it). Every other tensor keeps its dtype and bytes; the tokenizer and generation files travel along. A checkpoint
ternary per tensor can also be written in transformers' BitNet layout (``cpmkit.formats.bitnet``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable

import torch

from cpmkit import __version__
from cpmkit.atomic import atomic_dir
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.quantized_folder import LOG_NAME, quantized_tensors
from cpmkit.errors import CpmkitError
from cpmkit.formats import bitnet, ternary
from cpmkit.formats import hf_folder as hf
from cpmkit.formats.safetensors import ShardedWriter, TensorSlot
from cpmkit.quant.ternary import (
    TernaryGranularity,
    absmean_ternary,
    coarsest_common,
    detect_ternary,
    exact_ternary,
)


def shared_granularity(ck: Checkpoint, names: list[str], progress=iter) -> TernaryGranularity:
    """The granularity every linear in ``names`` is ternary at; one CpmkitError line naming the first that is
    not ternary."""
    reports = []
    for name, tensor in progress(ck.stream(names)):
        report = detect_ternary(tensor)
        if report is None:
            raise CpmkitError(f"{ck.root}: {name} is not ternary (its values are not s x {{-1, 0, +1}} at any "
                              "granularity); --to ternary:absmean makes any checkpoint ternary, with a loss")
        reports.append(report)
    return coarsest_common(reports)


def convert_to_ternary(ck: Checkpoint, out: Path, *, absmean_group: int | None = None, absmean: bool = False,
                       bitnet_layout: bool = False, overwrite: bool = False,
                       progress: Callable[[Iterable], Iterable] = iter,
                       log: Callable[[str], None] = lambda line: None) -> Path:
    """Pack ``ck``'s block linears exactly, or with ``absmean`` (per row, or per ``absmean_group``) into ``out``;
    ``bitnet_layout``: exactly, in transformers' BitNet layout (one scale per tensor)."""
    quantized = quantized_tensors(ck)
    names = list(quantized)
    if absmean:
        group, granularity = absmean_group, f"absmean-{'row' if absmean_group is None else f'g{absmean_group}'}"
    else:
        shared = shared_granularity(ck, names, progress)
        group, granularity = shared.group_size, shared.value
        log(f"ternary: every linear is ternary per {shared.value}")
        if bitnet_layout and shared is not TernaryGranularity.TENSOR:
            raise CpmkitError(f"{ck.root}: ternary:bitnet (transformers' BitLinear) holds one scale per tensor, but "
                              f"this checkpoint is ternary per {shared.value}; ternary:2bit and gguf:TQ2_0 hold it "
                              "exactly")
    for name in names:
        n, k = ck.tensors[name].shape
        if bitnet_layout and n % bitnet.BANDS:
            raise CpmkitError(f"{ck.root}: {name} has {n} output features; transformers unpacks a BitNet weight "
                              f"only when they are a multiple of {bitnet.BANDS}")
        if k % ternary.CODES_PER_BYTE or (group is not None and k % group):
            raise CpmkitError(f"{ck.root}: {name} has {k} input features, not a multiple of "
                              f"{group or ternary.CODES_PER_BYTE}")
    pack = _BitNetPack() if bitnet_layout else _TernaryPack(group, absmean, granularity)
    slots = []
    for name, ref in ck.tensors.items():
        slots += pack.slots(name, ref) if name in quantized else [
            TensorSlot(name, ref.dtype, ref.shape, math.prod(ref.shape))]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with ShardedWriter(tmp, slots, hf.SAFETENSORS_METADATA) as writer:
            for name, tensor in progress(ck.stream()):
                for stored, value in (pack.tensors(ck, name, tensor) if name in quantized else [(name, tensor)]):
                    writer.write(stored, value)
        hf.write_quantized_config(tmp, ck.config, pack.config(["lm_head"]))
        hf.copy_source_files(ck.root, tmp)
        (tmp / LOG_NAME).write_text(json.dumps({"quantizer": f"cpmkit {__version__}", "method": "ternary",
                                                "granularity": granularity, "layout": pack.layout}, indent=2) + "\n")
    return out


class _TernaryPack:
    """cpmkit's ternary pack: ``weight_packed`` (codes along K) and ``weight_scale`` per row or group."""

    layout = "cpmkit-ternary"

    def __init__(self, group: int | None, absmean: bool, granularity: str):
        self.group, self.absmean, self.granularity = group, absmean, granularity

    def slots(self, name: str, ref) -> list[TensorSlot]:
        n, k = ref.shape
        module = name.removesuffix(".weight")
        return [TensorSlot(f"{module}.weight_packed", torch.uint8, (n, k // ternary.CODES_PER_BYTE), n * k),
                TensorSlot(f"{module}.weight_scale", ref.dtype, (n, 1 if self.group is None else k // self.group), 0)]

    def tensors(self, ck: Checkpoint, name: str, tensor: torch.Tensor):
        packed = absmean_ternary(tensor, self.group) if self.absmean else exact_ternary(tensor, self.group)
        if packed is None:
            raise CpmkitError(f"{ck.root}: {name} is ternary per {self.granularity} only within bf16 rounding; "
                              "its magnitudes differ inside a group, so no pack holds it exactly")
        module = name.removesuffix(".weight")
        return [(f"{module}.weight_packed", ternary.pack_codes(packed.codes)), (f"{module}.weight_scale", packed.scales)]

    def config(self, ignore: list[str]) -> dict:
        return ternary.ternary_quantization_config(-1 if self.group is None else self.group, self.granularity,
                                                   "absmean" if self.absmean else "exact", ignore)


class _BitNetPack:
    """transformers' BitNet layout: ``weight`` (codes in bands of rows) and one ``weight_scale``."""

    layout = "bitnet"

    def slots(self, name: str, ref) -> list[TensorSlot]:
        n, k = ref.shape
        return [TensorSlot(name, torch.uint8, (-(-n // bitnet.BANDS), k), n * k),
                TensorSlot(f"{name.removesuffix('.weight')}.weight_scale", ref.dtype, (1,), 0)]

    def tensors(self, ck: Checkpoint, name: str, tensor: torch.Tensor):
        packed = exact_ternary(tensor, None)
        scales = None if packed is None else packed.scales[packed.scales != 0]  # an all-zero row has scale 0
        if scales is None or (scales.numel() and not bool((scales == scales[0]).all())):
            raise CpmkitError(f"{ck.root}: {name} is not ternary with one scale for the whole tensor")
        scale = scales[:1] if scales.numel() else torch.ones(1, dtype=tensor.dtype)
        return [(name, bitnet.pack_rows(packed.codes)), (f"{name.removesuffix('.weight')}.weight_scale", scale)]

    def config(self, ignore: list[str]) -> dict:
        return bitnet.quantization_config(ignore)
