"""``CausalLM``: the model skeleton every family's reference shares, built on the meta device and filled
by ``load_weights`` from a stream of (HF name, tensor), one tensor at a time.

Module paths equal the HF tensor names (``model.layers.0.self_attn.q_proj``), every linear is made by the
caller's ``linear_factory(name, in, out)``, and ``model.embed_tokens`` may be swapped for any module
mapping ids [B, T] to [B, T, H]. Families differ only in the attention and MLP they build and in their
three scalars (embedding scale, residual scale, logit divisor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from cpmkit.errors import CpmkitError
from cpmkit.models.layers import (
    DecoderLayer,
    KVCache,
    Linear,
    LinearFactory,
    RMSNorm,
    StoredEmbedding,
    StoredLinear,
    rope_cos_sin,
)
from cpmkit.spec import DROPPED_TENSOR_SUFFIXES, ModelSpec

# (spec, layer index, linear scoped to "model.layers.{i}.self_attn." or ".mlp.") -> module
BlockBuilder = Callable[[ModelSpec, int, Linear], nn.Module]

TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Scales:
    """MiniCPM's muP scalars (all 1 for plain Llama)."""

    embedding: float = 1.0  # scale_emb: multiplies the embedding output
    residual: float = 1.0  # scale_depth / sqrt(L): multiplies each branch before the residual add
    logit_divisor: float = 1.0  # hidden / dim_model_base: divides the final hidden state before lm_head

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "Scales":
        """The scalars of ``spec``'s muP settings (MiniCPM, MiniCPM3); all 1 without them (Llama)."""
        if spec.mup is None:
            return cls()
        return cls(embedding=spec.mup.scale_emb, residual=spec.mup.residual_scale(spec.num_layers),
                   logit_divisor=spec.mup.logit_divisor(spec.hidden_size))


class Backbone(nn.Module):
    """``model.*``: embedding, decoder layers, final norm (applied by ``CausalLM.head``)."""

    def __init__(self, spec: ModelSpec, layers: list[nn.Module], embedding_scale: float, weight_dtype: torch.dtype,
                 dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = StoredEmbedding(spec.vocab_size, spec.hidden_size, weight_dtype, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, weight_dtype)
        self.embedding_scale = embedding_scale

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) * self.embedding_scale
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        return h


def default_linear_factory(dtype: torch.dtype) -> LinearFactory:
    return lambda name, in_features, out_features: StoredLinear(in_features, out_features, dtype)


class CausalLM(nn.Module):
    """A decoder-only LM whose ``forward(input_ids [B, T], cache=None)`` returns float32 logits [B, T, V].

    ``dtype`` is the activations' dtype; ``weight_dtype`` (default: the same) the dtype its float weights are
    kept in: a bf16 checkpoint runs with bf16 weights and float32 activations, every weight converted
    exactly as it is used. Built on the meta device: nothing is allocated until ``load_weights`` assigns
    each tensor (cast to its parameter's dtype) in place of its meta parameter, so a checkpoint is held
    once; ``load_weights(names=...)`` and ``unload`` fill and empty one part at a time (the layer-streamed
    runner, ``cpmkit.models.streamed``). A tied head is a module whose weight is the embedding's
    Parameter; a quantized artifact may replace ``lm_head``.
    """

    def __init__(self, spec: ModelSpec, *, attention: BlockBuilder, mlp: BlockBuilder, scales: Scales,
                 linear_factory: LinearFactory | None = None, dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype | None = None):
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        weight_dtype = weight_dtype or dtype
        self.logit_divisor = scales.logit_divisor
        factory = linear_factory or default_linear_factory(weight_dtype)
        self._linear_names: list[str] = []

        def scoped(prefix: str) -> Linear:
            def make(name: str, in_features: int, out_features: int) -> nn.Module:
                self._linear_names.append(prefix + name)
                return factory(prefix + name, in_features, out_features)
            return make

        with torch.device("meta"):
            layers = [
                DecoderLayer(attention(spec, i, scoped(f"model.layers.{i}.self_attn.")),
                             mlp(spec, i, scoped(f"model.layers.{i}.mlp.")),
                             spec.hidden_size, spec.rms_norm_eps, scales.residual, weight_dtype)
                for i in range(spec.num_layers)
            ]
            self.model = Backbone(spec, layers, scales.embedding, weight_dtype, dtype)
            self.lm_head = scoped("")("lm_head", spec.hidden_size, spec.vocab_size)
        self._tie_head()

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        offset = cache.length if cache is not None else 0
        cos, sin = self.rope(offset, input_ids.shape[1], input_ids.device)
        h = self.model(input_ids, cos, sin, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.head(h)

    def rope(self, offset: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions ``offset .. offset + length``."""
        return rope_cos_sin(self.spec.rope, torch.arange(offset, offset + length, device=device))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first hidden state, [B, T, H] in the activations' dtype."""
        return self.model.embed_tokens(input_ids) * self.model.embedding_scale

    def head(self, h: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """float32 logits from the last block's output ``h`` [..., H] (final norm, logit divisor, lm_head). In the
        activations' dtype, then widened, as a deployment forms them (vLLM: bf16 logits, upcast for sampling); with
        ``exact``, in float32 whatever the activations' dtype, for scoring: bf16 logits near 20 are rounded to
        steps of 0.125."""
        if exact:
            h = h.float()
        return self.lm_head(self.model.norm(h) / self.logit_divisor).float()

    def linear_names(self) -> list[str]:
        """HF names (without ".weight") of every linear made through the factory, lm_head included (when
        tied it is the embedding used as a linear)."""
        return list(self._linear_names)

    def tensor_names(self) -> list[str]:
        """Every state_dict name ``load_weights`` fills (a tied head shares the embedding's)."""
        return list(self._targets())

    def _head_is_tied(self) -> bool:
        head = getattr(self.lm_head, "weight", None)
        return head is not None and head is getattr(self.model.embed_tokens, "weight", None)

    def _tie_head(self) -> None:
        # At construction only a plain head with a Parameter named "weight" of the embedding's shape can
        # share it; a quantized lm_head built from the embedding brings its own tensors and stays untied.
        if not self.spec.tie_word_embeddings:
            return
        head = getattr(self.lm_head, "weight", None)
        embedding = getattr(self.model.embed_tokens, "weight", None)
        if isinstance(head, nn.Parameter) and isinstance(embedding, nn.Parameter) and head.shape == embedding.shape:
            self.lm_head.weight = embedding

    def _targets(self) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
        """HF name -> (owning module, attribute, current tensor) for every tensor load_weights must fill."""
        out = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            if name == TIED_HEAD and self._head_is_tied():
                continue
            owner, _, attr = name.rpartition(".")
            out[name] = (self.get_submodule(owner), attr, tensor)
        return out

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], *, strict: bool = True,
                     names: Iterable[str] | None = None) -> None:
        """Assign each (HF name, tensor) of the stream to its parameter or buffer, floating tensors cast to
        the destination's dtype. Rotary caches of old .bin files are skipped; when the head is tied, an
        ``lm_head.weight`` in the stream is ignored (transformers re-ties it to the embedding too). With
        ``strict``, an unknown name or any tensor left unfilled raises CpmkitError. ``names``: fill only
        these (one part of the model), each of which must come."""
        tied = self._head_is_tied()  # assigning the embedding unties it; re-tied after the loop
        targets = self._targets()
        if names is not None:
            targets = {n: targets[n] for n in names}
        arch = self.spec.architecture
        filled = set()
        for name, tensor in tensors:
            if name.endswith(DROPPED_TENSOR_SUFFIXES) or (name == TIED_HEAD and tied):
                continue
            if name not in targets:
                if strict:
                    raise CpmkitError(f"{name}: unexpected tensor, {arch} with this config has no such weight")
                continue
            module, attr, current = targets[name]
            if tuple(tensor.shape) != tuple(current.shape):
                raise CpmkitError(f"{name}: shape {tuple(tensor.shape)} does not match the expected "
                                  f"{tuple(current.shape)} for this config")
            value = _cast(name, tensor, current)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=current.requires_grad)
            else:
                module._buffers[attr] = value
            filled.add(name)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        missing = [n for n in targets if n not in filled]
        if strict and missing:
            raise CpmkitError(f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors missing in all)")

    def unload(self, names: Iterable[str]) -> None:
        """Put meta placeholders back in place of these tensors (and drop what quantized modules derived from
        them), so the memory of one part is freed once the runner is done with it."""
        tied = self._head_is_tied()
        targets = self._targets()
        for name in names:
            module, attr, current = targets[name]
            placeholder = torch.empty(current.shape, dtype=current.dtype, device="meta")
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(placeholder, requires_grad=False)
            else:
                module._buffers[attr] = placeholder
            if hasattr(module, "clear_cache"):
                module.clear_cache()
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def parts(self) -> list[tuple[str, list[str]]]:
        """The model's tensor names by part, in running order: ``embedding``, ``layer.0`` ... ``layer.{L-1}``,
        ``head`` (the final norm and lm_head; a tied float head includes the embedding's weight)."""
        names = self.tensor_names()
        layers = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(self.spec.num_layers)]
        embedding = [n for n in names if n.startswith("model.embed_tokens.")]
        head = [n for n in names if n.startswith(("model.norm.", "lm_head."))]
        if self._head_is_tied():
            head += embedding
        return [("embedding", embedding), *((f"layer.{i}", layer) for i, layer in enumerate(layers)), ("head", head)]


def _cast(name: str, tensor: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The incoming tensor in the destination's dtype (and device, once the model is materialised)."""
    if tensor.dtype != current.dtype and not (tensor.is_floating_point() and current.is_floating_point()):
        raise CpmkitError(f"{name}: dtype {tensor.dtype} cannot be loaded into a {current.dtype} tensor")
    device = tensor.device if current.is_meta else current.device
    return tensor.detach().to(device=device, dtype=current.dtype)
