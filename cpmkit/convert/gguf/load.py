"""Load a GGUF file (written by cpmkit or by llama.cpp's tools) into cpmkit's reference model, so that the
model computes what llama.cpp computes with that file, over the very same stored weights.

* The spec is read back from the metadata the way llama.cpp reads it (``convert.families``: its defaults
  for absent keys, the muP scalars MiniCPM3's graph hard-codes, the RMS epsilon its MLA latent norms use),
  unless the caller passes the source checkpoint's spec.
* q/k rows are un-permuted (llama.cpp's interleaved rope pairs back to HF's rotate-half layout; for a
  quantized tensor whole rows of blocks move, so nothing is re-quantized), merged experts are split.
* Quantized linears are ``cpmkit.convert.gguf.weight.gguf_linear`` holding the file's bytes; a quantized
  token embedding dequantizes only the rows it looks up (llama.cpp's ``get_rows``); a file without
  ``output.weight`` uses the embedding as its head, quantized as stored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from cpmkit.convert.gguf.families import GGUFFamily, family_for_arch, unpermute_rows
from cpmkit.convert.gguf.weight import gguf_linear
from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.blocks import dequantize
from cpmkit.formats.gguf.file import GGUFContents, StoredTensor, read_gguf
from cpmkit.kernels import Backend
from cpmkit.models import CausalLM, build_model
from cpmkit.models.source import ModelSource
from cpmkit.spec import ModelSpec, read_spec

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"


class GGUFEmbedding(nn.Module):
    """A token embedding stored quantized: rows gathered as bytes, then dequantized (ggml ``get_rows``)."""

    def __init__(self, raw: torch.Tensor, qtype: QType, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.qtype = qtype
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.register_buffer("raw", raw)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.raw[input_ids.reshape(-1)], self.qtype)  # [B*T, H] float32
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.dtype)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one checkpoint tensor lives in the file."""

    tensor: StoredTensor
    expert: int | None
    permute_heads: int | None

    @property
    def qtype(self) -> QType:
        return self.tensor.qtype

    def raw(self) -> torch.Tensor:
        data = self.tensor.torch_raw(self.expert)
        return unpermute_rows(data, self.permute_heads) if self.permute_heads else data

    def placeholder(self) -> torch.Tensor:
        shape = self.tensor.raw.shape[1:] if self.expert is not None else self.tensor.raw.shape
        return torch.empty(shape, dtype=torch.uint8, device="meta")

    def value(self) -> torch.Tensor:
        """The tensor as float32, in the checkpoint's shape."""
        shape = self.tensor.shape[1:] if self.expert is not None else self.tensor.shape
        return dequantize(self.raw(), self.qtype).reshape(shape)


def open_gguf(path: str | Path, *, spec: ModelSpec | None = None, dtype: torch.dtype = torch.float32,
              backend: Backend = Backend.AUTO, cache_dequantized: bool = False) -> ModelSource:
    """The model llama.cpp would run from the GGUF file at ``path``, as cpmkit's reference model read lazily
    (``spec``: run with the source checkpoint's spec instead of the one read from the metadata).

    ``dtype`` is the float dtype of unquantized weights and activations; quantized weights stay as stored
    (``backend`` and ``cache_dequantized`` go to every QuantLinear)."""
    contents = read_gguf(path)
    family = family_for_arch(contents.architecture)
    spec = spec or spec_from_gguf(contents, family)
    sources = _sources(contents, family, spec)
    tied = f"{HEAD}.weight" not in sources
    if tied:
        sources[f"{HEAD}.weight"] = sources[f"{EMBEDDING}.weight"]
        spec = dataclasses.replace(spec, tie_word_embeddings=True)
    quantized = {name.removesuffix(".weight"): s for name, s in sources.items() if s.qtype not in FLOAT_TYPES}

    def linear(name: str, in_features: int, out_features: int) -> nn.Module:
        if name not in quantized:
            return nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        return gguf_linear(quantized[name].placeholder(), quantized[name].qtype, (out_features, in_features),
                           backend=backend, cache_dequantized=cache_dequantized, name=name)

    def build() -> CausalLM:
        model = build_model(spec, linear_factory=linear, dtype=dtype)
        if EMBEDDING in quantized:
            model.model.embed_tokens = GGUFEmbedding(quantized[EMBEDDING].placeholder(),
                                                     quantized[EMBEDDING].qtype, spec.hidden_size, dtype)
        return model

    def read(names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            module, _, part = name.rpartition(".")
            if module in quantized and part == "raw":
                yield name, quantized[module].raw()
            else:
                yield name, sources[name].value()

    return ModelSource(spec, build, read)


def load_gguf_model(path: str | Path, **options) -> tuple[CausalLM, ModelSpec]:
    """:func:`open_gguf` (same options), loaded whole: (model, the spec it runs with)."""
    source = open_gguf(path, **options)
    return source.load(), source.spec


def spec_from_gguf(contents: GGUFContents, family: GGUFFamily) -> ModelSpec:
    """The spec llama.cpp runs a file with (its metadata, read with llama.cpp's defaults)."""
    spec = read_spec(family.read_config(contents), str(contents.path))
    if spec.mla is not None:  # llama.cpp's MLA latent norms use the model's rms_norm_eps
        spec = dataclasses.replace(spec, mla=dataclasses.replace(spec.mla, latent_norm_eps=spec.rms_norm_eps))
    return spec


def _sources(contents: GGUFContents, family: GGUFFamily, spec: ModelSpec) -> dict[str, _Source]:
    """Checkpoint tensor name -> its place in the file; checks that every tensor the spec needs is there."""
    n_expert = spec.moe.num_experts if spec.moe else 0
    out: dict[str, _Source] = {}
    for name, stored in contents.tensors.items():
        hf_names = family.hf_names(name, n_expert)
        if hf_names is None:
            continue  # LongRoPE factors: part of the spec
        merged = len(stored.shape) == 3
        if merged and stored.shape[0] != len(hf_names):
            raise CpmkitError(f"{contents.path}: {name} holds {stored.shape[0]} experts, the metadata says {n_expert}")
        for e, hf in enumerate(hf_names):
            out[hf] = _Source(stored, e if merged else None, family.permute_heads(spec, hf))
    expected = spec.tensor_shapes()
    for hf, shape in expected.items():
        if hf == f"{HEAD}.weight" and hf not in out:
            continue  # tied: the embedding serves as the head
        if hf not in out:
            raise CpmkitError(f"{contents.path}: no tensor for {hf} ({len(out)} of {len(expected)} found)")
        s = out[hf]
        found = s.tensor.shape[1:] if s.expert is not None else s.tensor.shape
        if tuple(found) != tuple(shape):
            raise CpmkitError(f"{contents.path}: {s.tensor.name} has shape {list(found)}, the metadata implies "
                              f"{list(shape)}")
    return out
