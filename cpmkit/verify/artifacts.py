"""The artifact formats ``cpmkit verify`` reads, one registration each, recognised by content.

A format registers four functions: ``detect(path)`` (cheap, looks at bytes or config, never raises for a
foreign path), ``load(path, reference_spec, options)`` (the model the format's runtime would run, built on
cpmkit's reference forward with ``QuantLinear`` weights), ``describe(path)`` (variant, the artifact's own
files, bytes of model tensors) and ``weight_type(module)`` (the label of one quantized linear, for the speed
table). Adding GPTQ, AWQ, Marlin or ternary folders is one more ``register_format`` call.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cpmkit.errors import CpmkitError
from cpmkit.formats import mlx_folder
from cpmkit.formats import safetensors as st
from cpmkit.formats.gguf.file import is_gguf_file
from cpmkit.kernels import Backend, QuantLinear
from cpmkit.models import CausalLM
from cpmkit.spec import ModelSpec

MLX_METADATA_FORMAT = "mlx"  # safetensors __metadata__ "format" of files mlx writes


@dataclass(frozen=True)
class LoadOptions:
    """How to build the artifact's model: float dtype of activations and unquantized weights, which kernels
    run the quantized linears, and whether the CPU path keeps dequantized weights between calls."""

    dtype: torch.dtype = torch.float32
    backend: Backend = Backend.AUTO
    cache_dequantized: bool = False


@dataclass(frozen=True)
class ArtifactDescription:
    format: str
    variant: str  # quantization within the format: Q4_K_M, 4bit-g64, mixed_4_6-g64, bfloat16
    files: tuple[Path, ...]  # what a runtime loads: the GGUF file; an MLX folder's config, weights, tokenizer
    tensor_bytes: int  # bytes of every model tensor, quantization scales included

    @property
    def name(self) -> str:
        return f"{self.format}:{self.variant}"

    @property
    def file_size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def bits_per_weight(self, parameter_count: int) -> float:
        return 8 * self.tensor_bytes / parameter_count


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    description: str  # what the format looks like on disk, for the error on an unknown path
    detect: Callable[[Path], bool]
    load: Callable[[Path, ModelSpec, LoadOptions], CausalLM]
    describe: Callable[[Path], ArtifactDescription]
    weight_type: Callable[[QuantLinear], str]


FORMATS: dict[str, ArtifactFormat] = {}


def register_format(fmt: ArtifactFormat) -> ArtifactFormat:
    assert fmt.name not in FORMATS, f"artifact format {fmt.name} registered twice"
    FORMATS[fmt.name] = fmt
    return fmt


def detect_format(path: str | Path) -> ArtifactFormat:
    path = Path(path)
    if not path.exists():
        raise CpmkitError(f"{path}: no such file or folder")
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt
    hint = " (it looks like a Hugging Face checkpoint: pass it as --reference)" if (path / "config.json").is_file() \
        else ""
    raise CpmkitError(f"{path}: not an artifact cpmkit can verify{hint}; expected one of: "
                      f"{'; '.join(f.description for f in FORMATS.values())}")


def load_artifact(path: str | Path, reference_spec: ModelSpec, options: LoadOptions) -> CausalLM:
    """The artifact's model, checked to predict over the reference's vocabulary."""
    path = Path(path)
    model = detect_format(path).load(path, reference_spec, options)
    if model.spec.vocab_size != reference_spec.vocab_size or model.spec.hidden_size != reference_spec.hidden_size:
        raise CpmkitError(f"{path}: vocabulary {model.spec.vocab_size} / hidden size {model.spec.hidden_size} "
                          f"differ from the reference's {reference_spec.vocab_size} / {reference_spec.hidden_size}; "
                          "it was not converted from this checkpoint")
    return model


def describe_artifact(path: str | Path) -> ArtifactDescription:
    path = Path(path)
    return detect_format(path).describe(path)


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---- GGUF ------------------------------------------------------------------------------------------------

def _gguf_load(path: Path, reference_spec: ModelSpec, options: LoadOptions) -> CausalLM:
    from cpmkit.verify.load_gguf import load_gguf_model

    # the spec comes from the file's own metadata, as llama.cpp reads it: a wrong key shows up as divergence
    model, _ = load_gguf_model(path, dtype=options.dtype, backend=options.backend,
                               cache_dequantized=options.cache_dequantized)
    return model


def _gguf_describe(path: Path) -> ArtifactDescription:
    from cpmkit.convert.gguf import describe_gguf
    from cpmkit.formats.gguf.file import read_gguf

    info = describe_gguf(path)
    contents = read_gguf(path)
    variant = info["file_type"]
    if variant is None:  # no general.file_type: name it by its most common quantized type
        counts = Counter(t.qtype.name for t in contents.tensors.values() if len(t.shape) > 1)
        variant = counts.most_common(1)[0][0] if counts else "F32"
    return ArtifactDescription("gguf", variant, (path,), sum(t.raw.nbytes for t in contents.tensors.values()))


def _gguf_weight_type(module: QuantLinear) -> str:
    return module.fmt.qtype.name


# ---- MLX -------------------------------------------------------------------------------------------------

def _mlx_detect(path: Path) -> bool:
    if not (path / mlx_folder.CONFIG_NAME).is_file():
        return False
    try:
        config = mlx_folder.read_config(path)
    except CpmkitError:
        return False
    if isinstance(config.get("quantization"), dict):
        return True
    weights = sorted(path.glob(mlx_folder.WEIGHT_GLOB))
    if not weights:
        return False
    try:
        _, metadata = st.read_header(weights[0])
    except CpmkitError:
        return False
    return (metadata or {}).get("format") == MLX_METADATA_FORMAT


def _mlx_load(path: Path, reference_spec: ModelSpec, options: LoadOptions) -> CausalLM:
    from cpmkit.verify.load_mlx import load_mlx_model

    model, _ = load_mlx_model(path, dtype=options.dtype, backend=options.backend,
                              cache_dequantized=options.cache_dequantized)
    return model


def _mlx_variant(config: dict[str, Any]) -> str:
    """``4bit-g64``; ``mixed_4_6-g64`` when layers differ in bits (the name of mlx-lm's recipe); the float
    dtype when unquantized."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict):
        return str(config.get("torch_dtype") or config.get("dtype") or "float")
    bits = {quantization.get("bits")} | {v.get("bits") for v in quantization.values() if isinstance(v, dict)}
    bits.discard(None)
    low, high = min(bits), max(bits)
    label = f"{low}bit" if low == high else f"mixed_{low}_{high}"
    return f"{label}-g{quantization.get('group_size')}"


def mlx_artifact_files(path: Path) -> tuple[Path, ...]:
    """The files mlx-lm reads from the folder: config, index, weights and the copied tokenizer files."""
    names = {mlx_folder.CONFIG_NAME, mlx_folder.INDEX_NAME, *mlx_folder.COPIED_FILES}
    files = {p for p in path.iterdir() if p.is_file() and p.name in names}
    files |= {p for pattern in (mlx_folder.WEIGHT_GLOB, *mlx_folder.COPIED_GLOBS) for p in path.glob(pattern)}
    return tuple(sorted(files))


def _mlx_describe(path: Path) -> ArtifactDescription:
    config = mlx_folder.read_config(path)
    tensors = mlx_folder.index_tensors(path)
    tensor_bytes = sum(t.entry.end - t.entry.begin for t in tensors.values())
    return ArtifactDescription("mlx", _mlx_variant(config), mlx_artifact_files(path), tensor_bytes)


def _mlx_weight_type(module: QuantLinear) -> str:
    return f"mlx{module.fmt.bits}g{module.fmt.group_size}"


register_format(ArtifactFormat("gguf", "a GGUF file (starting with the bytes GGUF)", is_gguf_file, _gguf_load,
                               _gguf_describe, _gguf_weight_type))
register_format(ArtifactFormat("mlx", "an MLX folder (config.json with 'quantization', or safetensors with "
                               "format=mlx)", _mlx_detect, _mlx_load, _mlx_describe, _mlx_weight_type))
