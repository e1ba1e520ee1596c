"""Read a CPM.cu Marlin folder (cpmkit's, or OpenBMB's ``*-marlin-cpmcu`` repos) into cpmkit's model.

The Marlin tiles are undone exactly at load, one fused tensor at a time: ``qkv_proj`` and ``gate_up_proj`` are
unpacked into codes ``[K, N]``, split back into q/k/v and gate/up along N, and handed to the model as GPTQ
buffers (qweight packed along K, symmetric zeros, scales in GPTQ order, ``g_idx = k // 128``), which the GPTQ
kernel weight then repacks for the Triton kernels. Only the codes of the tensor being read are held (1 byte a
weight, transient), beside the GPTQ buffers of the block being loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from cpmkit.convert.gptq.weight import GPTQWeight, gptq_linear
from cpmkit.convert.quantized_folder import weight_dtype_of
from cpmkit.errors import CpmkitError
from cpmkit.formats import marlin
from cpmkit.formats.gptq.config import CONFIG
from cpmkit.formats.gptq.pack import pack_qzeros, pack_rows
from cpmkit.formats.safetensors import StoredTensor, index_folder
from cpmkit.jsonfile import read_json_object
from cpmkit.kernels import Backend
from cpmkit.models import CausalLM, build_model
from cpmkit.models.causal_lm import default_linear_factory
from cpmkit.models.source import ModelSource
from cpmkit.spec import read_spec

LINEARS = sum(marlin.FUSED.values(), ()) + marlin.UNFUSED
GPTQ_SHAPES = {"qweight": lambda n, k: (k * marlin.BITS // 32, n),
               "qzeros": lambda n, k: (k // marlin.GROUP_SIZE, n * marlin.BITS // 32),
               "scales": lambda n, k: (k // marlin.GROUP_SIZE, n), "g_idx": lambda n, k: (k,)}


def marlin_folder_tensors(folder: Path) -> dict[str, StoredTensor]:
    return index_folder(folder, (marlin.WEIGHTS_FILE,), "a CPM.cu Marlin folder")


def open_marlin(folder: str | Path, *, dtype: torch.dtype = torch.float32, backend: Backend = Backend.AUTO,
                cache_dequantized: bool = False) -> ModelSource:
    folder = Path(folder)
    config = read_json_object(folder / CONFIG, missing="not found; a Marlin folder holds the model's config")
    spec = read_spec(config, str(folder / CONFIG))
    tensors = marlin_folder_tensors(folder)
    shapes = spec.tensor_shapes()
    _check(folder, spec, tensors)
    scale_dtype = tensors["model.layers.0.self_attn.qkv_proj.scales"].dtype
    weight_dtype = weight_dtype_of(tensors, (".scales",))
    plain = default_linear_factory(weight_dtype)

    def linear(name: str, in_features: int, out_features: int) -> nn.Module:
        if _local(name) not in LINEARS:
            return plain(name, in_features, out_features)
        fmt = GPTQWeight(marlin.BITS, marlin.GROUP_SIZE, (out_features, in_features), "gptq", v1=False)
        placeholders = {b: torch.empty(shape(out_features, in_features), device="meta",
                                       dtype=scale_dtype if b == "scales" else torch.int32)
                        for b, shape in GPTQ_SHAPES.items()}
        return gptq_linear(placeholders, fmt, backend=backend, cache_dequantized=cache_dequantized, name=name)

    def build() -> CausalLM:
        return build_model(spec, linear_factory=linear, dtype=dtype, weight_dtype=weight_dtype)

    unfused = _Unfused(tensors, shapes)

    def read(names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, unfused.read(name)

    return ModelSource(spec, build, read)


def _check(folder: Path, spec, tensors: dict[str, StoredTensor]) -> None:
    """Every tensor CPM.cu reads, with the shape its config implies (CPM.cu itself does not check)."""
    shapes = spec.tensor_shapes()
    expected = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        local = _local(module)
        if local not in LINEARS:
            expected[name] = tuple(shape)
            continue
        fused = marlin.fused_name(module)
        target = fused[0] if fused else module
        parts = [p for f, ps in marlin.FUSED.items() if target.endswith(f) for p in ps] or [local]
        prefix = module[: len(module) - len(local)]
        n = sum(shapes[f"{prefix}{p}.weight"][0] for p in parts)
        k = shape[1]
        expected[f"{target}.qweight"] = (k // 16, 2 * n)
        expected[f"{target}.scales"] = (k // marlin.GROUP_SIZE, n)
    for name, shape in expected.items():
        if name not in tensors:
            raise CpmkitError(f"{folder / marlin.WEIGHTS_FILE}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise CpmkitError(f"{folder / marlin.WEIGHTS_FILE}: {name} has shape {list(tensors[name].shape)}, "
                              f"{CONFIG} implies {list(shape)}")
        if name.endswith(".qweight") and tensors[name].dtype != torch.int32:
            raise CpmkitError(f"{folder / marlin.WEIGHTS_FILE}: {name} is {tensors[name].dtype}, not int32")
    extra = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if extra:
        raise CpmkitError(f"{folder / marlin.WEIGHTS_FILE}: tensor {extra[0]} has no place in this model "
                          f"({len(extra)} such; CPM.cu's loader refuses them)")


def _local(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (empty outside the layers)."""
    return module.partition(".layers.")[2].partition(".")[2]


class _Unfused:
    """GPTQ buffers of the separate linears, made from the Marlin tensors; the codes and scales of the fused
    tensor last undone are kept until a linear of another one is asked for."""

    def __init__(self, tensors: dict[str, StoredTensor], shapes: dict[str, tuple[int, ...]]):
        self.tensors, self.shapes = tensors, shapes
        self._held: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def read(self, name: str) -> torch.Tensor:
        module, _, buffer = name.rpartition(".")
        if buffer not in GPTQ_SHAPES or _local(module) not in LINEARS:
            return self.tensors[name].read()
        n, k = self.shapes[f"{module}.weight"]
        if buffer == "g_idx":
            return (torch.arange(k, dtype=torch.int32) // marlin.GROUP_SIZE)
        if buffer == "qzeros":
            zeros = torch.full((n, k // marlin.GROUP_SIZE), 8, dtype=torch.int16)
            return pack_qzeros(zeros, marlin.BITS, v1=False)
        codes, scales = self._slice(module)
        return pack_rows(codes.contiguous(), marlin.BITS) if buffer == "qweight" else scales.contiguous()

    def _slice(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[K, n]`` and scales ``[groups, n]`` of one linear, cut from its (un-tiled) Marlin tensor."""
        fused = marlin.fused_name(module)
        target, place = fused if fused else (module, 0)
        if self._held is None or self._held[0] != target:
            qweight = self.tensors[f"{target}.qweight"].read()
            k = qweight.shape[0] * 16
            self._held = (target, marlin.unpack_marlin(qweight, k),
                          marlin.permute_scales(self.tensors[f"{target}.scales"].read()))
        _, codes, scales = self._held
        layer = module[: len(module) - len(_local(module))]
        parts = [p for f, ps in marlin.FUSED.items() if target.endswith(f) for p in ps]
        widths = [self.shapes[f"{layer}{p}.weight"][0] for p in parts] if parts else [codes.shape[1]]
        start = sum(widths[:place])
        return codes[:, start : start + widths[place]], scales[:, start : start + widths[place]]
