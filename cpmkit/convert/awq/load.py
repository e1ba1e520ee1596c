"""Read an AWQ folder (cpmkit's, AutoAWQ's, GPTQModel's, OpenBMB's ``*-AutoAWQ``) into cpmkit's model.

Settings come from config.json's ``quantization_config`` (``quant_method: awq``), else ``quant_config.json`` or
``quantize_config.json`` (older AutoAWQ), with AutoAWQ's synonyms (``w_bit``, ``q_group_size``) and ``version``
in any case. The GEMM interleave (or the GEMV row layout) is undone exactly at load, one linear at a time, into
GPTQ buffers with zero points (``checkpoint_format gptq_v2``), which the GPTQ kernel weight repacks for the
Triton kernels; a compressed-tensors folder made by cpmkit's AWQ is read by the GPTQ reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from cpmkit.convert.gptq.weight import GPTQWeight, gptq_linear
from cpmkit.convert.quantized_folder import stored_linear_shape, weight_dtype_of
from cpmkit.errors import CpmkitError
from cpmkit.formats import awq
from cpmkit.formats.gptq.pack import pack_qweight, pack_qzeros
from cpmkit.formats.safetensors import StoredTensor, index_folder
from cpmkit.jsonfile import read_json_object
from cpmkit.kernels import Backend
from cpmkit.models import CausalLM, build_model
from cpmkit.models.causal_lm import default_linear_factory
from cpmkit.models.source import ModelSource
from cpmkit.spec import read_spec

CONFIG = "config.json"
SIDE_CONFIGS = ("quant_config.json", "quantize_config.json")
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "*awq*.safetensors")


@dataclass(frozen=True)
class AWQConfig:
    bits: int
    group_size: int
    version: str  # gemm | gemv
    where: Path


def awq_config_of(folder: Path) -> dict[str, Any] | None:
    """The folder's AWQ settings, or None when it has none."""
    found = read_json_object(folder / CONFIG, required=False).get("quantization_config")
    if isinstance(found, dict) and found.get("quant_method") == "awq":
        return found
    for name in SIDE_CONFIGS:
        side = read_json_object(folder / name, required=False)
        if side and (side.get("quant_method") == "awq" or "w_bit" in side or
                     str(side.get("version", "")).lower() in awq.VERSIONS):
            return side
    return None


def read_awq_config(folder: Path) -> AWQConfig:
    found = awq_config_of(folder)
    if found is None:
        raise CpmkitError(f"{folder}: no AWQ quantization_config in {CONFIG} or {', '.join(SIDE_CONFIGS)}")
    where = folder / CONFIG
    bits = found.get("bits", found.get("w_bit"))
    group = found.get("group_size", found.get("q_group_size"))
    version = str(found.get("version", "gemm")).lower()
    if bits != awq.BITS:
        raise CpmkitError(f"{where}: AWQ bits {bits!r}; AutoAWQ's layouts are 4-bit")
    if not isinstance(group, int) or group <= 0:
        raise CpmkitError(f"{where}: AWQ group_size {group!r}: expected a positive integer")
    if version not in awq.VERSIONS:
        raise CpmkitError(f"{where}: AWQ version {version!r}; cpmkit reads {' and '.join(awq.VERSIONS)}")
    if found.get("zero_point") is False:
        raise CpmkitError(f"{where}: zero_point false; AutoAWQ's GEMM/GEMV kernels always use zero points")
    return AWQConfig(bits, group, version, where)


def awq_folder_tensors(folder: Path) -> dict[str, StoredTensor]:
    return index_folder(folder, WEIGHT_PATTERNS, "an AWQ model folder")


def open_awq(folder: str | Path, *, dtype: torch.dtype = torch.float32, backend: Backend = Backend.AUTO,
             cache_dequantized: bool = False) -> ModelSource:
    folder = Path(folder)
    config = read_awq_config(folder)
    spec = read_spec(read_json_object(folder / CONFIG, missing="not found; an AWQ folder holds the model's config"),
                     str(folder / CONFIG))
    tensors = awq_folder_tensors(folder)
    shapes = spec.tensor_shapes()
    modules = sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight"))
    for module in modules:
        _check(folder, module, config, *stored_linear_shape(folder, spec, module), tensors)
    weight_dtype = weight_dtype_of(tensors, (".scales",))
    plain = default_linear_factory(weight_dtype)
    quantized = set(modules)

    def linear(name: str, in_features: int, out_features: int) -> nn.Module:
        if name not in quantized:
            return plain(name, in_features, out_features)
        fmt = GPTQWeight(awq.BITS, config.group_size, (out_features, in_features), "gptq", v1=False)
        groups = in_features // config.group_size
        shapes_ = {"qweight": (in_features // 8, out_features), "qzeros": (groups, out_features // 8),
                   "scales": (groups, out_features), "g_idx": (in_features,)}
        placeholders = {b: torch.empty(s, device="meta", dtype=torch.float16 if b == "scales" else torch.int32)
                        for b, s in shapes_.items()}
        return gptq_linear(placeholders, fmt, backend=backend, cache_dequantized=cache_dequantized, name=name)

    def build() -> CausalLM:
        return build_model(spec, linear_factory=linear, dtype=dtype, weight_dtype=weight_dtype)

    names = set(build().tensor_names())
    gptq_names = {f"{m}.{b}" for m in quantized for b in ("qweight", "qzeros", "scales", "g_idx")}
    extra = sorted(set(tensors) - names - {f"{m}.{b}" for m in quantized for b in ("qzeros", "scales")}
                   - {"lm_head.weight"})
    if extra:
        raise CpmkitError(f"{folder}: tensor {extra[0]} has no place in this model ({len(extra)} such tensors)")
    missing = sorted(names - set(tensors) - gptq_names)
    if missing:
        raise CpmkitError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    buffers = _GPTQBuffers(tensors, config, shapes)

    def read(wanted: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in wanted:
            module, _, buffer = name.rpartition(".")
            yield name, buffers.read(module, buffer) if module in quantized else tensors[name].read()

    return ModelSource(spec, build, read)


def _check(folder: Path, module: str, config: AWQConfig, n: int, k: int, tensors: dict[str, StoredTensor]) -> None:
    if k % config.group_size or n % 8 or k % 8:
        raise CpmkitError(f"{folder}: {module} is {n}x{k}: AWQ needs input features divisible by the group size "
                          f"{config.group_size} and both by 8")
    groups = k // config.group_size
    if config.version == "gemm":
        expected = {"qweight": (k, n // 8), "qzeros": (groups, n // 8), "scales": (groups, n)}
    else:
        width = awq.gemv_zeros_width(k, config.group_size)
        expected = {"qweight": (n, k // 8), "qzeros": (n, width), "scales": (n, 8 * width)}
    for buffer, shape in expected.items():
        stored = tensors.get(f"{module}.{buffer}")
        if stored is None:
            raise CpmkitError(f"{folder}: {module}.{buffer} is missing")
        if tuple(stored.shape) != shape:
            raise CpmkitError(f"{folder}: {module}.{buffer} has shape {list(stored.shape)}, but a {config.version} "
                              f"{n}x{k} weight in groups of {config.group_size} needs {list(shape)}")


class _GPTQBuffers:
    """The GPTQ buffers of one AWQ linear at a time (its four are read one after another)."""

    def __init__(self, tensors: dict[str, StoredTensor], config: AWQConfig, shapes: dict[str, tuple[int, ...]]):
        self.tensors, self.config, self.shapes = tensors, config, shapes
        self._held: tuple[str, dict[str, torch.Tensor]] | None = None

    def read(self, module: str, buffer: str) -> torch.Tensor:
        if self._held is None or self._held[0] != module:
            self._held = (module, self._convert(module))
        return self._held[1][buffer]

    def _convert(self, module: str) -> dict[str, torch.Tensor]:
        n, k = self.shapes[f"{module}.weight"]
        groups = k // self.config.group_size
        qweight, qzeros, scales = (self.tensors[f"{module}.{b}"].read() for b in ("qweight", "qzeros", "scales"))
        if self.config.version == "gemm":
            codes, zeros = awq.unpack_gemm(qweight, qzeros)
        else:
            codes, zeros, scales = awq.unpack_gemv(qweight, qzeros, scales, groups)
            scales = scales.T
        return {"qweight": pack_qweight(codes, awq.BITS), "qzeros": pack_qzeros(zeros, awq.BITS, v1=False),
                "scales": scales.to(torch.float16).contiguous(),
                "g_idx": torch.arange(k, dtype=torch.int32) // self.config.group_size}
