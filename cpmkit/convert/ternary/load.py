"""Read a ternary pack folder into cpmkit's model, lazily: a linear is ternary exactly when its ``weight_packed``
is stored; everything else keeps its stored dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from cpmkit.convert.quantized_folder import stored_linear_shape, stored_model_source
from cpmkit.convert.ternary.weight import TernaryPackWeight
from cpmkit.errors import CpmkitError
from cpmkit.formats import ternary
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
    """(config.json, its checked quantization_config)."""
    config = read_json_object(folder / CONFIG, missing="not found; a ternary pack holds the model's config")
    return config, ternary.read_quantization_config(config, str(folder / CONFIG))


def open_ternary(folder: str | Path, *, dtype: torch.dtype = torch.float32, backend: Backend = Backend.AUTO,
                 cache_dequantized: bool = False) -> ModelSource:
    folder = Path(folder)
    config, quantization = read_ternary_config(folder)
    spec = read_spec(config, str(folder / CONFIG))
    tensors = ternary_folder_tensors(folder)
    group = quantization["group_size"]
    formats = {module: TernaryPackWeight(stored_linear_shape(folder, spec, module, "ternary"), group)
               for module in (name.removesuffix(PACKED) for name in tensors if name.endswith(PACKED))}

    def check(name: str, tensor: torch.Tensor) -> None:
        # a 2-bit field is 3 when both its bits are set
        if name.endswith(PACKED) and bool((tensor & (tensor >> 1) & 0x55).any()):
            raise CpmkitError(f"{folder}: {name} holds code 3, which no ternary weight has")

    return stored_model_source(folder, spec, tensors, formats, dtype=dtype, backend=backend,
                               cache_dequantized=cache_dequantized, scale_suffixes=(".weight_scale",), check=check)
