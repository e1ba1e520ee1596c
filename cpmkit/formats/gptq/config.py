"""The configuration every GPTQ runtime reads, written as the superset that all of them accept, and read back
from any published layout (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §1.7, checked against AutoGPTQ 0.7.1
and main, GPTQModel 7.3, transformers 5 + optimum, vLLM and CPM.cu's ``gptq2marlin``).

Written (``config.json["quantization_config"]`` and ``quantize_config.json``, the same dict): top-level
``bits, group_size, desc_act, static_groups, sym, true_sequential, damp_percent, lm_head`` (CPM.cu's converter
asserts ``static_groups`` and ``lm_head`` at the top level; GPTQModel 7 moved them under ``meta``, which
that converter rejects), ``quant_method: gptq``, ``checkpoint_format`` and ``format`` always equal
(transformers lets the first win, GPTQModel the second), ``pack_dtype: int32`` and ``meta.quantizer``. Never
``is_marlin_format``: GPTQModel refuses any file that has it. Asymmetric weights are always ``gptq_v2``.

compressed-tensors (``quant_method: compressed-tensors``, ``format: pack-quantized``): one config group of
``Linear`` weights, as compressed-tensors 0.18 serializes llm-compressor's W4A16 / W4A16_ASYM schemes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpmkit.errors import CpmkitError
from cpmkit.jsonfile import read_json_object

CONFIG = "config.json"
QUANTIZE_CONFIG = "quantize_config.json"
GPTQ_FORMATS = ("gptq", "gptq_v2")
CT_VERSION = "0.18.0"  # the compressed-tensors serialization written
CT_FORMAT = "pack-quantized"
# Keys of config.json and quantize_config.json compared when both exist (OpenBMB's MiniCPM-2B-sft-int4 has
# contradicting desc_act and sym).
COMPARED_KEYS = ("bits", "group_size", "desc_act", "sym", "static_groups", "checkpoint_format")


@dataclass(frozen=True)
class GPTQConfig:
    """What a reader needs to decode a GPTQ or compressed-tensors checkpoint."""

    method: str  # "gptq" or "compressed-tensors"
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    desc_act: bool
    static_groups: bool
    checkpoint_format: str  # gptq (v1 zero points, stored minus 1) | gptq_v2
    warnings: tuple[str, ...] = ()

    @property
    def v1(self) -> bool:
        return self.method == "gptq" and self.checkpoint_format == "gptq"


def gptq_quantization_config(*, bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                             damp: float, quantizer: str) -> dict[str, Any]:
    fmt = "gptq" if sym else "gptq_v2"
    return {"bits": bits, "group_size": group_size, "desc_act": desc_act, "static_groups": static_groups,
            "sym": sym, "true_sequential": True, "damp_percent": damp, "lm_head": False, "quant_method": "gptq",
            "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32",
            "meta": {"quantizer": [quantizer], "damp_auto_increment": 0.01, "static_groups": static_groups,
                     "true_sequential": True}}


def compressed_tensors_config(*, bits: int, group_size: int, sym: bool, ignore: list[str],
                              actorder: str | None) -> dict[str, Any]:
    """``actorder``: "static" (quantized most-active-first inside fixed groups; the layout does not change) or
    None."""
    weights = {"actorder": actorder, "block_structure": None, "dynamic": False, "group_size": group_size,
               "num_bits": bits, "observer": "memoryless_minmax", "observer_kwargs": {}, "scale_dtype": None,
               "strategy": "group" if group_size != -1 else "channel", "symmetric": sym, "type": "int",
               "zp_dtype": None if sym else "torch.int8"}
    if group_size == -1:
        weights["group_size"] = None
    return {"config_groups": {"group_0": {"format": CT_FORMAT, "input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": CT_FORMAT, "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


def quantization_config_of(folder: Path) -> dict[str, Any] | None:
    """The folder's GPTQ or compressed-tensors quantization config (config.json's, else quantize_config.json's),
    or None when it has neither."""
    config = read_json_object(folder / CONFIG, required=False)
    found = config.get("quantization_config") or config.get("compression_config")
    if isinstance(found, dict) and found.get("quant_method") in ("gptq", "compressed-tensors"):
        return found
    alone = read_json_object(folder / QUANTIZE_CONFIG, required=False)
    if alone and alone.get("quant_method", "gptq") == "gptq" and "bits" in alone:
        return alone
    return None


def read_gptq_config(folder: Path) -> GPTQConfig:
    """The folder's quantization settings, checked; disagreements between config.json and quantize_config.json
    are kept as warnings (config.json's values are the ones runtimes use)."""
    found = quantization_config_of(folder)
    if found is None:
        raise CpmkitError(f"{folder}: no GPTQ or compressed-tensors quantization_config in {CONFIG} or "
                          f"{QUANTIZE_CONFIG}")
    if found.get("quant_method") == "compressed-tensors":
        return _compressed_tensors(folder, found)
    where = f"{folder / CONFIG}" if "quant_method" in found and (folder / CONFIG).is_file() else \
        f"{folder / QUANTIZE_CONFIG}"
    if "is_marlin_format" in found and found["is_marlin_format"]:
        raise CpmkitError(f"{where}: is_marlin_format is true: a legacy AutoGPTQ Marlin checkpoint, which no current "
                          "runtime reads")
    fmt = found.get("checkpoint_format") or found.get("format") or "gptq"
    if fmt not in GPTQ_FORMATS:
        raise CpmkitError(f"{where}: checkpoint_format {fmt!r}; cpmkit reads {' and '.join(GPTQ_FORMATS)}")
    bits, group = found.get("bits"), found.get("group_size", -1)
    if bits not in (2, 3, 4, 8) or not isinstance(group, int) or not (group == -1 or group > 0):
        raise CpmkitError(f"{where}: bits {bits!r} / group_size {group!r}: expected bits 2, 3, 4 or 8 and a group "
                          "size of -1 or a positive integer")
    warnings = _disagreements(folder)
    return GPTQConfig("gptq", bits, group, bool(found.get("sym", True)), bool(found.get("desc_act", False)),
                      bool(found.get("static_groups", (found.get("meta") or {}).get("static_groups", False))),
                      fmt, warnings)


def _compressed_tensors(folder: Path, found: dict[str, Any]) -> GPTQConfig:
    groups = found.get("config_groups") or {}
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)]
    if found.get("format") != CT_FORMAT or len(weights) != 1 or not isinstance(weights[0], dict):
        raise CpmkitError(f"{folder / CONFIG}: compressed-tensors with format {found.get('format')!r} and "
                          f"{len(weights)} weight groups; cpmkit reads one {CT_FORMAT} group")
    w = weights[0]
    if w.get("type") != "int" or w.get("num_bits") not in (2, 3, 4, 8) or w.get("strategy") not in ("group",
                                                                                                     "channel"):
        raise CpmkitError(f"{folder / CONFIG}: compressed-tensors weights {w.get('type')} {w.get('num_bits')}-bit "
                          f"by {w.get('strategy')}; cpmkit reads int 2/3/4/8-bit by group or channel")
    group = w.get("group_size") if w.get("strategy") == "group" else -1
    static = w.get("actorder") in ("static", "weight")  # "weight" is the older name of "static"
    return GPTQConfig("compressed-tensors", w["num_bits"], group, bool(w.get("symmetric", True)),
                      w.get("actorder") == "group", static, "gptq_v2")


def _disagreements(folder: Path) -> tuple[str, ...]:
    config = read_json_object(folder / CONFIG, required=False).get("quantization_config")
    alone = read_json_object(folder / QUANTIZE_CONFIG, required=False)
    if not isinstance(config, dict) or not alone:
        return ()
    return tuple(f"{CONFIG} says {key}={config[key]!r} but {QUANTIZE_CONFIG} says {key}={alone[key]!r}; using "
                 f"{CONFIG}'s" for key in COMPARED_KEYS if key in config and key in alone and config[key] != alone[key])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
