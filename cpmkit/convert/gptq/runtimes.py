"""What runtimes make of a GPTQ folder, for ``cpmkit inspect``: whether vLLM runs it through its Marlin kernel
(``gptq_marlin``), and whether OpenBMB's CPM.cu converter (``scripts/model_convert/gptq2marlin.py``) accepts it,
and why not (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §1.7, §4.3, §4.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # GPTQ_MARLIN_MIN_THREAD_N / _K
CPMCU_REQUIRED = {"bits": 4, "checkpoint_format": "gptq", "desc_act": False, "group_size": 128, "lm_head": False,
                  "static_groups": True, "sym": True}
CPMCU_WEIGHTS = "model.safetensors"


def vllm_marlin_reason(quantization: dict[str, Any], shapes: list[tuple[int, int]]) -> str | None:
    """Why vLLM would not pick gptq_marlin for this ``quantization_config`` and these linear shapes [N, K]."""
    if quantization.get("quant_method") != "gptq":
        return f"quant_method is {quantization.get('quant_method')!r}; gptq_marlin is chosen for 'gptq' configs"
    missing = [k for k in ("bits", "group_size", "sym", "desc_act") if quantization.get(k) is None]
    if missing:
        return f"quantization_config lacks {missing[0]!r}, which vLLM needs to choose gptq_marlin"
    if (quantization["bits"], quantization["sym"]) not in ((4, True), (8, True)):
        return (f"gptq_marlin needs symmetric 4- or 8-bit weights, these are {quantization['bits']}-bit "
                f"{'symmetric' if quantization['sym'] else 'asymmetric'}")
    if quantization["group_size"] not in MARLIN_GROUP_SIZES:
        return f"gptq_marlin takes group sizes {MARLIN_GROUP_SIZES}, not {quantization['group_size']}"
    bad = [(n, k) for n, k in shapes if n % MARLIN_MIN_N or k % MARLIN_MIN_K]
    if bad:
        return (f"a {bad[0][0]}x{bad[0][1]} linear: Marlin needs output features divisible by {MARLIN_MIN_N} and "
                f"input features by {MARLIN_MIN_K}")
    return None


def cpmcu_reason(quantization: dict[str, Any], folder: Path) -> str | None:
    """Why CPM.cu's gptq2marlin would refuse the folder: it asserts these top-level keys and reads one
    model.safetensors."""
    for key, value in CPMCU_REQUIRED.items():
        if quantization.get(key) != value:
            return f"gptq2marlin asserts quantization_config[{key!r}] == {value!r}, this has {quantization.get(key)!r}"
    if not (folder / CPMCU_WEIGHTS).is_file():
        return f"gptq2marlin reads a single {CPMCU_WEIGHTS}, which this folder does not have"
    return None
