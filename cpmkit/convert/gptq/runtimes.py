"""What runtimes make of a GPTQ folder, for ``cpmkit inspect``: which vLLM linear method loads it, and whether OpenBMB's CPM.cu converter (``scripts/model_convert/gptq2marlin.py``) accepts it,
and why not (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §1.7, §4.3, §4.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # GPTQ_MARLIN_MIN_THREAD_N / _K
CPMCU_REQUIRED = {"bits": 4, "checkpoint_format": "gptq", "desc_act": False, "group_size": 128, "lm_head": False,
                  "static_groups": True, "sym": True}
CPMCU_WEIGHTS = "model.safetensors"


def vllm_kernel(quantization: dict[str, Any], shapes: list[tuple[int, int]]) -> tuple[str | None, str | None]:
    """(the vLLM linear method that would load this ``quantization_config`` with these linear shapes [N, K],
    None) or (None, why vLLM would refuse it). Since vLLM's 2026 GPTQ rework every GPTQ config goes to
    gptq_marlin, which takes only symmetric 4/8-bit; compressed-tensors pack-quantized goes to its WNA16 scheme
    (4/8-bit, zero points allowed), also Marlin kernels."""
    method = quantization.get("quant_method")
    if method == "compressed-tensors":
        bits = _ct_bits(quantization)
        if bits not in (4, 8):
            return None, f"compressed-tensors WNA16 takes 4- or 8-bit weights, these are {bits}-bit"
        return "compressed-tensors WNA16 (Marlin kernels)", None
    if method != "gptq":
        return None, f"quant_method is {method!r}, not gptq or compressed-tensors"
    missing = [k for k in ("bits", "group_size", "sym", "desc_act") if quantization.get(k) is None]
    if missing:
        return None, f"quantization_config lacks {missing[0]!r}, which vLLM's gptq_marlin reads"
    if (quantization["bits"], quantization["sym"]) not in ((4, True), (8, True)):
        return None, (f"gptq_marlin needs symmetric 4- or 8-bit weights, these are {quantization['bits']}-bit "
                      f"{'symmetric' if quantization['sym'] else 'asymmetric'}")
    if quantization["group_size"] not in MARLIN_GROUP_SIZES:
        return None, f"gptq_marlin takes group sizes {MARLIN_GROUP_SIZES}, not {quantization['group_size']}"
    bad = [(n, k) for n, k in shapes if n % MARLIN_MIN_N or k % MARLIN_MIN_K]
    if quantization["desc_act"] and bad:  # without act-order vLLM pads the shapes
        return None, (f"a {bad[0][0]}x{bad[0][1]} linear: act-order Marlin needs output features divisible by "
                      f"{MARLIN_MIN_N} and input features by {MARLIN_MIN_K}")
    return "gptq_marlin (repacked to Marlin at load)", None


def _ct_bits(quantization: dict[str, Any]) -> Any:
    groups = [g for g in (quantization.get("config_groups") or {}).values() if isinstance(g, dict)]
    return (groups[0].get("weights") or {}).get("num_bits") if len(groups) == 1 else None


def cpmcu_reason(quantization: dict[str, Any], folder: Path) -> str | None:
    """Why CPM.cu's gptq2marlin would refuse the folder: it asserts these top-level keys and reads one
    model.safetensors."""
    if quantization.get("quant_method") != "gptq":
        return "gptq2marlin reads AutoGPTQ tensors (quant_method gptq), not compressed-tensors"
    for key, value in CPMCU_REQUIRED.items():
        if quantization.get(key) != value:
            return f"gptq2marlin asserts quantization_config[{key!r}] == {value!r}, this has {quantization.get(key)!r}"
    if not (folder / CPMCU_WEIGHTS).is_file():
        return f"gptq2marlin reads a single {CPMCU_WEIGHTS}, which this folder does not have"
    return None
