"""Load an MLX folder (written by cpmkit or by ``mlx_lm.convert``) into cpmkit's reference model, so that the
model computes what mlx-lm 0.32 computes with that folder, over the very same quantized weights.

Quantized linears are ``cpmkit.convert.mlx.weight.mlx_linear`` (Triton on CUDA, dequantize-then-matmul on
CPU) holding the folder's uint32/scales/biases tensors unchanged; a quantized embedding is a row gather
followed by MLX's dequantization. The folder is read the way ``mlx_lm.utils.load_model`` reads it:

* weights come from ``model*.safetensors``; a module is quantized exactly when ``<path>.scales`` exists,
  with bits and group size taken from the tensor shapes (``infer_quant_config``), checked against the
  module's ``quantization`` entry when there is one;
* config keys an mlx-lm ``ModelArgs`` defaults are read with mlx-lm's defaults (``MLX_LM_DEFAULTS``): a
  MiniCPM-2B folder made by ``mlx_lm.convert`` runs with rope_theta 1e6, and is loaded so here too;
* mlx-lm's runtime choices are kept: LongRoPE always uses ``long_factor``; MiniCPM3's latent norms use
  eps 1e-5; a tied MiniCPM3 head skips the logit division; a llama head tied to a quantized embedding
  multiplies by that embedding's quantized weight (``as_linear``); a minicpm folder without
  ``lm_head.weight`` gets the embedding as its head (``sanitize``).

Folders that mlx-lm refuses to load (a tied ``minicpm`` config, an unknown model_type, missing tensors)
raise CpmkitError here as well.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from cpmkit.convert.mlx.weight import mlx_linear
from cpmkit.errors import CpmkitError
from cpmkit.formats.mlx import folder as mlx_folder
from cpmkit.formats.mlx.pack import unpack_codes
from cpmkit.formats.safetensors import StoredTensor
from cpmkit.kernels import Backend
from cpmkit.models import CausalLM, build_model
from cpmkit.models.source import ModelSource
from cpmkit.quant.affine import AffineQuantized, AffineSpec, dequantize_affine
from cpmkit.spec import ARCHITECTURES, Family, ModelSpec, RopeKind, read_spec

MLX_LM_FAMILIES = {"minicpm": Family.MINICPM, "minicpm3": Family.MINICPM3, "llama": Family.LLAMA}
# ModelArgs defaults of mlx-lm 0.32.2 (models/minicpm.py, minicpm3.py, llama.py) where the checkpoint's own
# code differs.
MLX_LM_DEFAULTS: dict[str, dict[str, Any]] = {
    "minicpm": {"rope_theta": 1000000.0, "tie_word_embeddings": False},
    "minicpm3": {"rope_theta": 1000000.0, "tie_word_embeddings": False},
    "llama": {"rope_theta": 10000.0, "tie_word_embeddings": True},
}
MINICPM3_ORIGINAL_MAX_DEFAULT = 4096  # minicpm3.py: rope_scaling.get("original_max_position_embeddings", 4096)
MINICPM3_LATENT_NORM_EPS = 1e-5  # minicpm3.py builds q_a/kv_a_layernorm as nn.RMSNorm(dim): mlx's default eps
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"
QUANT_PARTS = ("weight", "scales", "biases")


class QuantEmbedding(nn.Module):
    """An MLX-quantized embedding: ``scale * q + bias`` of the gathered rows, as mlx's ``QuantizedEmbedding``
    (``dequantize(weight[ids], scales[ids], biases[ids])``), formed in float32 like QuantLinear's weights
    (mlx rounds it to the scales' dtype, a runtime precision choice) and cast to the model dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, spec: AffineSpec,
                 dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.embedding_dim = scales.shape[-1] * spec.group_size
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        words = self.weight.view(torch.int32)[input_ids]  # CUDA cannot index uint32 tensors; same bits
        codes = unpack_codes(words, self.spec.bits, self.embedding_dim)  # [B, T, H]
        rows = AffineQuantized(codes, self.scales[input_ids].float(), self.biases[input_ids].float(), self.spec)
        return dequantize_affine(rows).to(self.dtype)


def open_mlx(folder: str | Path, *, dtype: torch.dtype = torch.float32, backend: Backend = Backend.AUTO,
             cache_dequantized: bool = False) -> ModelSource:
    """The model mlx-lm would run from ``folder``, as cpmkit's reference model read lazily.

    ``dtype`` is the float dtype of unquantized weights and activations; quantized weights stay as stored
    (``backend`` and ``cache_dequantized`` go to every QuantLinear). The folder's tensors are checked
    against the model as mlx-lm's strict load checks them, before anything is read.
    """
    folder = Path(folder)
    config = mlx_folder.read_config(folder)
    tensors = mlx_folder.index_tensors(folder)
    model_type = config.get("model_type")
    if model_type not in MLX_LM_FAMILIES:
        raise CpmkitError(f"{folder / mlx_folder.CONFIG_NAME}: model_type {model_type!r} is not one mlx-lm runs "
                          f"for MiniCPM; expected one of {', '.join(MLX_LM_FAMILIES)}")
    head_from_embedding = _head_from_embedding(folder, config, tensors)
    spec = _runtime_spec(folder, config, head_from_embedding)
    quantized = _quantized_modules(folder, config, tensors, spec)
    if head_from_embedding and EMBEDDING in quantized:
        if spec.family is Family.MINICPM:
            raise CpmkitError(f"{folder}: no lm_head.weight and a quantized embedding; mlx-lm's minicpm sanitize "
                              "copies only embed_tokens.weight into a float lm_head, so the folder does not load")
        quantized[HEAD] = quantized[EMBEDDING]
    sources = {module: (EMBEDDING if module == HEAD and head_from_embedding else module) for module in quantized}

    def linear(name: str, in_features: int, out_features: int) -> nn.Module:
        if name not in quantized:
            return nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        weight, scales, biases = _placeholders(tensors, sources[name])
        q = quantized[name]
        return mlx_linear(weight, scales, biases, q.bits, q.group_size, backend=backend,
                          cache_dequantized=cache_dequantized, name=name)

    def build() -> CausalLM:
        model = build_model(spec, linear_factory=linear, dtype=dtype)
        if EMBEDDING in quantized:
            model.model.embed_tokens = QuantEmbedding(*_placeholders(tensors, EMBEDDING), quantized[EMBEDDING],
                                                      dtype)
        if spec.family is Family.MINICPM3 and head_from_embedding:
            model.logit_divisor = 1.0  # minicpm3.py's tied head: embed_tokens.as_linear(out), no division
        return model

    # a head tied to a quantized embedding reads the embedding's tensors
    stored_as = {f"{HEAD}.{part}": f"{EMBEDDING}.{part}" for part in QUANT_PARTS} \
        if sources.get(HEAD) == EMBEDDING else {}
    # llama's sanitize drops a tied checkpoint's lm_head.weight
    skipped = {f"{HEAD}.weight"} if head_from_embedding and spec.family is Family.LLAMA else set()
    _check_strict(folder, build().tensor_names(), tensors, stored_as, skipped)

    def read(names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, tensors[stored_as.get(name, name)].read()

    return ModelSource(spec, build, read)


def load_mlx_model(folder: str | Path, **options) -> tuple[CausalLM, ModelSpec]:
    """:func:`open_mlx` (same options), loaded whole: (model, the spec it runs with)."""
    source = open_mlx(folder, **options)
    return source.load(), source.spec


def _check_strict(folder: Path, names: list[str], tensors: dict[str, StoredTensor], stored_as: dict[str, str],
                  skipped: set[str]) -> None:
    """mlx-lm's ``load_weights(strict=True)``: every tensor in the folder has a place in the model, and every
    place a tensor (a dtype mismatch shows when loading)."""
    wanted = {stored_as.get(n, n) for n in names}
    extra = sorted(set(tensors) - wanted - skipped - set(stored_as.values()))
    if extra:
        raise CpmkitError(f"{folder}: tensor {extra[0]} is not part of this {folder.name} model's config "
                          f"({len(extra)} such tensors); mlx-lm's strict load refuses the folder")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CpmkitError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing in all)")


def _head_from_embedding(folder: Path, config: dict[str, Any], tensors: dict[str, StoredTensor]) -> bool:
    """Whether mlx-lm computes the logits with the embedding matrix (tied) rather than lm_head."""
    model_type = config["model_type"]
    tied = bool(config.get("tie_word_embeddings", MLX_LM_DEFAULTS[model_type]["tie_word_embeddings"]))
    if model_type == "minicpm":
        if tied:
            raise CpmkitError(f"{folder / mlx_folder.CONFIG_NAME}: tie_word_embeddings is true for minicpm; "
                              "mlx-lm's sanitize adds lm_head.weight, which the tied model lacks, so the folder "
                              "does not load (write it untied with an explicit lm_head)")
        return f"{HEAD}.weight" not in tensors  # sanitize copies the embedding into lm_head
    return tied


def _runtime_spec(folder: Path, config: dict[str, Any], head_from_embedding: bool) -> ModelSpec:
    model_type = config["model_type"]
    family = MLX_LM_FAMILIES[model_type]
    source = str(folder / mlx_folder.CONFIG_NAME)
    effective = {**MLX_LM_DEFAULTS[model_type], **config, "tie_word_embeddings": head_from_embedding,
                 "architectures": [next(a for a, f in ARCHITECTURES.items() if f is family)]}
    effective.pop("rope_parameters", None)  # mlx-lm reads rope_theta and rope_scaling only
    if family is Family.MINICPM3:
        scaling = config.get("rope_scaling")
        if not isinstance(scaling, dict):
            raise CpmkitError(f"{source}: minicpm3 without rope_scaling; mlx-lm's minicpm3 model needs it")
        effective["rope_scaling"] = {"original_max_position_embeddings": MINICPM3_ORIGINAL_MAX_DEFAULT, **scaling}
    spec = read_spec(effective, source)
    rope = spec.rope
    if family is Family.MINICPM3 and rope.kind is not RopeKind.LONGROPE:
        raise CpmkitError(f"{source}: minicpm3 rope_scaling is {rope.kind.value}; mlx-lm runs minicpm3 with "
                          "LongRoPE whatever the type says")
    if rope.kind is RopeKind.LONGROPE:
        spec = dataclasses.replace(spec, rope=dataclasses.replace(rope, short_factor=rope.long_factor))
    if spec.mla is not None:
        spec = dataclasses.replace(spec, mla=dataclasses.replace(spec.mla, latent_norm_eps=MINICPM3_LATENT_NORM_EPS))
    return spec


def _quantized_modules(folder: Path, config: dict[str, Any], tensors: dict[str, StoredTensor],
                       spec: ModelSpec) -> dict[str, AffineSpec]:
    """Module path -> setting for every module stored with ``.scales``."""
    modules = sorted(name.removesuffix(".scales") for name in tensors if name.endswith(".scales"))
    quantization = config.get("quantization")
    if modules and not isinstance(quantization, dict):
        raise CpmkitError(f"{folder}: {modules[0]}.scales is stored but config.json has no 'quantization' object")
    shapes = spec.tensor_shapes()
    default = {k: quantization[k] for k in ("bits", "group_size", "mode") if k in quantization} if modules else {}
    out = {}
    for module in modules:
        entry = quantization.get(module, default)
        if entry is False:
            raise CpmkitError(f"{folder}: config.json keeps {module} in float but {module}.scales is stored")
        shape = shapes.get(f"{module}.weight")
        if shape is None or f"{module}.weight" not in tensors or f"{module}.biases" not in tensors:
            raise CpmkitError(f"{folder}: {module}.scales has no matching quantized weight in this "
                              f"{spec.architecture} model (need {module}.weight, .scales and .biases)")
        out[module] = _affine_spec(folder, module, entry, shape[1], tensors)
    return out


def _affine_spec(folder: Path, module: str, entry: Any, in_features: int,
                 tensors: dict[str, StoredTensor]) -> AffineSpec:
    """Bits and group size from the shapes, as mlx-lm's ``infer_quant_config``; a config entry must agree
    (a null group_size, as mlx_lm.convert writes for recipes without --q-group-size, means the default)."""
    weight, scales = tensors[f"{module}.weight"], tensors[f"{module}.scales"]
    mode = entry.get("mode", "affine") if isinstance(entry, dict) else "affine"
    if mode != "affine" or not scales.dtype.is_floating_point:
        raise CpmkitError(f"{folder}: {module} is quantized in MLX mode {mode!r} with {scales.dtype} scales; "
                          "cpmkit reads affine quantization only")
    groups = scales.shape[-1]
    if in_features % groups or (weight.shape[-1] * 32) % in_features:
        raise CpmkitError(f"{folder}: {module}.weight {list(weight.shape)} and .scales {list(scales.shape)} do not "
                          f"fit an input dimension of {in_features}")
    spec = AffineSpec(bits=weight.shape[-1] * 32 // in_features, group_size=in_features // groups)
    if isinstance(entry, dict):
        for key in ("bits", "group_size"):
            if entry.get(key) is not None and entry[key] != getattr(spec, key):
                raise CpmkitError(f"{folder}: config.json says {module} has {key} {entry[key]} but its tensors "
                                  f"hold {key} {getattr(spec, key)}")
    return spec


def _placeholders(tensors: dict[str, StoredTensor], module: str) -> tuple[torch.Tensor, ...]:
    """Meta tensors of the stored shapes and dtypes; load_weights fills them."""
    return tuple(torch.empty(tensors[f"{module}.{p}"].shape, dtype=tensors[f"{module}.{p}"].dtype, device="meta")
                 for p in QUANT_PARTS)
