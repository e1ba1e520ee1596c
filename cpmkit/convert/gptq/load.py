"""Read a GPTQ or compressed-tensors folder (cpmkit's, AutoGPTQ's, GPTQModel's, llm-compressor's, OpenBMB's
published ones) into cpmkit's model, read lazily: the model vLLM or transformers would run from it.

Published layouts read: weights in ``model*.safetensors`` or ``gptq_model-<bits>bit-<group>g.safetensors``
(sharded or not), quantization settings in config.json's ``quantization_config`` or only in
``quantize_config.json``, ``checkpoint_format`` gptq (zeros stored minus 1) or gptq_v2, act-order weights
with their ``g_idx``. A linear is quantized exactly when its ``qweight`` (``weight_packed``) is stored;
everything else keeps its stored dtype. When config.json and quantize_config.json disagree, config.json (what
vLLM and transformers read) is used and the disagreement is reported (``describe``'s notes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cpmkit.convert.gptq.weight import CT_ZERO, GPTQWeight
from cpmkit.convert.quantized_folder import stored_linear_shape, stored_model_source
from cpmkit.errors import CpmkitError
from cpmkit.formats.gptq.config import CONFIG, GPTQConfig, read_gptq_config
from cpmkit.formats.safetensors import StoredTensor, index_folder
from cpmkit.jsonfile import read_json_object
from cpmkit.kernels import Backend
from cpmkit.models.source import ModelSource
from cpmkit.spec import ModelSpec, read_spec

# model_gptq.safetensors is CPM.cu's Marlin file (the marlin plug-in's), not GPTQ
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "gptq_model*.safetensors")
PACKED = {"gptq": "qweight", "compressed-tensors": "weight_packed"}


def folder_tensors(folder: Path) -> dict[str, StoredTensor]:
    return index_folder(folder, WEIGHT_PATTERNS, "a GPTQ model folder")


def quantized_modules(config: GPTQConfig, tensors: dict[str, StoredTensor]) -> list[str]:
    suffix = "." + PACKED[config.method]
    return sorted(name.removesuffix(suffix) for name in tensors if name.endswith(suffix))


def weight_format(config: GPTQConfig, module: str, shape: tuple[int, int],
                  tensors: dict[str, StoredTensor]) -> GPTQWeight:
    layout = "gptq" if config.method == "gptq" else "compressed-tensors"
    return GPTQWeight(config.bits, config.group_size, (int(shape[0]), int(shape[1])), layout, config.v1,
                      asym=f"{module}.{CT_ZERO}" in tensors)


def open_gptq(folder: str | Path, *, dtype: torch.dtype = torch.float32, backend: Backend = Backend.AUTO,
              cache_dequantized: bool = False) -> ModelSource:
    folder = Path(folder)
    config = read_gptq_config(folder)
    model_config = read_json_object(folder / CONFIG, missing="not found; a GPTQ folder holds the model's config")
    spec = read_spec(model_config, str(folder / CONFIG))
    tensors = folder_tensors(folder)
    formats = {module: weight_format(config, module, stored_linear_shape(folder, spec, module), tensors)
               for module in quantized_modules(config, tensors)}
    def check(name: str, tensor: torch.Tensor) -> None:
        module, _, buffer = name.rpartition(".")
        if buffer == "g_idx" and module in formats:
            check_g_idx(folder, name, tensor, formats[module].groups)

    return stored_model_source(folder, spec, tensors, formats, dtype=dtype, backend=backend,
                               cache_dequantized=cache_dequantized, check=check)


def check_g_idx(folder: Path, name: str, g_idx: torch.Tensor, groups: int) -> None:
    """Every input feature's group must exist: a published file may hold anything."""
    bad = (g_idx < 0) | (g_idx >= groups)
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise CpmkitError(f"{folder}: {name}[{k}] is {int(g_idx[k])}, but the weight has groups 0..{groups - 1}")


def model_spec(folder: Path) -> ModelSpec:
    return read_spec(read_json_object(folder / CONFIG), str(folder / CONFIG))
