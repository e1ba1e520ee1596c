"""Read a ternary pack folder (or transformers' BitNet layout) into cpmkit's model, lazily: a linear is ternary
exactly when its ``weight_packed`` is stored (BitNet: its ``weight`` is uint8); everything else keeps its stored
dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from cpmkit.convert.quantized_folder import stored_linear_shape, stored_model_source
from cpmkit.convert.ternary.weight import BitNetWeight, TernaryPackWeight
from cpmkit.errors import CpmkitError
from cpmkit.formats import bitnet, ternary
from cpmkit.formats.safetensors import StoredTensor, index_folder
from cpmkit.jsonfile import read_json_object
from cpmkit.kernels import Backend
from cpmkit.models.source import ModelSource
from cpmkit.spec import read_spec

CONFIG = "config.json"
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")
PACKED = ".weight_packed"


def ternary_folder_tensors(folder: Path) -> dict[str, StoredTensor]:
    return index_folder(folder, WEIGHT_PATTERNS, "a ternary pack folder")


def read_ternary_config(folder: Path) -> tuple[dict, dict]:
    """(config.json, its checked quantization_config: cpmkit's ternary pack, or transformers' BitNet layout)."""
    config = read_json_object(folder / CONFIG, missing="not found; a ternary pack holds the model's config")
    q = config.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == bitnet.METHOD:
        return config, bitnet.read_quantization_config(config, str(folder / CONFIG))
    return config, ternary.read_quantization_config(config, str(folder / CONFIG))


def open_ternary(folder: str | Path, *, dtype: torch.dtype = torch.float32, backend: Backend = Backend.AUTO,
                 cache_dequantized: bool = False) -> ModelSource:
    folder = Path(folder)
    config, quantization = read_ternary_config(folder)
    spec = read_spec(config, str(folder / CONFIG))
    tensors = ternary_folder_tensors(folder)
    if quantization["quant_method"] == bitnet.METHOD:  # a linear is ternary where its weight is stored as bytes
        codes = {name for name, t in tensors.items() if name.endswith(".weight") and t.dtype == torch.uint8}
        formats = {name.removesuffix(".weight"): BitNetWeight(stored_linear_shape(folder, spec, name.removesuffix(
            ".weight"), "ternary"), quantization["linear_class"]) for name in codes}
    else:
        codes = {name for name in tensors if name.endswith(PACKED)}
        formats = {name.removesuffix(PACKED): TernaryPackWeight(stored_linear_shape(
            folder, spec, name.removesuffix(PACKED), "ternary"), quantization["group_size"]) for name in codes}

    def check(name: str, tensor: torch.Tensor) -> None:
        # a 2-bit field is 3 when both its bits are set
        if name in codes and bool((tensor & (tensor >> 1) & 0x55).any()):
            raise CpmkitError(f"{folder}: {name} holds code 3, which no ternary weight has")

    return stored_model_source(folder, spec, tensors, formats, dtype=dtype, backend=backend,
                               cache_dequantized=cache_dequantized, scale_suffixes=(".weight_scale",), check=check)
