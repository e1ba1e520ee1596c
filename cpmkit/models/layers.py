"""The pieces every MiniCPM family's reference forward shares: RMSNorm, rotary embeddings (default, linear,
dynamic NTK, LongRoPE), causal GQA attention, the gated MLP and the KV cache.

Every linear layer is made by a ``Linear`` callable scoped to its module's HF name prefix, so quantized
linears drop in by name. Facts: ../../../shared/minicpm/ARCHITECTURES.md §2.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cpmkit.kernels.linear import fused_forward, linear_by_rows
from cpmkit.spec import Activation, ModelSpec, RopeKind, RopeSpec

# (name, in_features, out_features) -> module mapping [..., in] to [..., out]; ``name`` is the HF tensor
# name of the weight without ".weight".
LinearFactory = Callable[[str, int, int], nn.Module]
# The same, with ``name`` relative to the module being built (e.g. "q_proj").
Linear = Callable[[str, int, int], nn.Module]


# Weight elements converted to the activations' dtype at once by StoredLinear: bounds the transient copy.
UPCAST_CHUNK_ELEMENTS = 1 << 22


class RMSNorm(nn.Module):
    """Variance in float32, normalised value cast back to the input dtype, then times the weight: the
    order of MiniCPM's remote ``rms_layernorm`` and transformers' ``LlamaRMSNorm``. The weight keeps its
    stored dtype and is converted to the activations' (exactly, from bf16/fp16 to float32)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight.to(x.dtype) * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


class StoredLinear(nn.Module):
    """``x @ W.T`` with ``W [out, in]`` kept in its stored dtype (bf16 for the reference) and the product
    formed in the activations' dtype: when they differ, the weight is converted a block of rows at a time,
    so a float32 forward of a bf16 model never holds a float32 copy of more than ``UPCAST_CHUNK_ELEMENTS``."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype:
            return F.linear(x, w)
        step = max(1, UPCAST_CHUNK_ELEMENTS // self.in_features)
        if step >= self.out_features:
            return F.linear(x, w.to(x.dtype))
        return linear_by_rows(x, self.out_features, lambda start, stop: w[start:stop].to(x.dtype), step)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


class StoredEmbedding(nn.Module):
    """A token embedding kept in its stored dtype; the looked-up rows come out in ``dtype`` (exactly)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, weight_dtype: torch.dtype, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=weight_dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(self.dtype)


def _base_inv_freq(theta: float, dim: int, device: torch.device) -> torch.Tensor:
    # 1 / theta^(2i/d) in float32, as transformers' compute_default_rope_parameters.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _default_inv_freq(rope: RopeSpec, seq_len: int, device: torch.device) -> torch.Tensor:
    return _base_inv_freq(rope.theta, rope.dim, device)


def _linear_inv_freq(rope: RopeSpec, seq_len: int, device: torch.device) -> torch.Tensor:
    # Dividing the frequencies equals dividing the positions (remote MiniCPMLinearScalingRotaryEmbedding).
    return _base_inv_freq(rope.theta, rope.dim, device) / rope.factor


def _dynamic_inv_freq(rope: RopeSpec, seq_len: int, device: torch.device) -> torch.Tensor:
    # Dynamic NTK (remote MiniCPMDynamicNTKScalingRotaryEmbedding, transformers _compute_dynamic_ntk_parameters):
    # beyond max_position the base grows with the current length. Keys already in a KV cache keep the base
    # they were rotated with, as in every runtime, so decoding past max_position differs from one full forward.
    if seq_len <= rope.max_position:
        return _base_inv_freq(rope.theta, rope.dim, device)
    growth = rope.factor * seq_len / rope.max_position - (rope.factor - 1)
    return _base_inv_freq(rope.theta * growth ** (rope.dim / (rope.dim - 2)), rope.dim, device)


def _longrope_inv_freq(rope: RopeSpec, seq_len: int, device: torch.device) -> torch.Tensor:
    # Long factors once the highest position + 1 exceeds original_max_position_embeddings, else short:
    # transformers' rule (longrope_frequency_update). The references disagree here:
    # - the remote MiniCPM code builds its cos/sin cache at init for max_position_embeddings and rebuilds
    #   it only for a longer KV length, so it uses long factors whenever max(max_position, kv_len) > original;
    # - mlx-lm's SuScaledRoPE always uses the long factors;
    # - llama.cpp chooses once from the context size (n_ctx > n_ctx_orig).
    # The remote code and transformers agree when max_position_embeddings == original (MiniCPM3, MiniCPM4,
    # 4.1); mlx-lm agrees with them only where the short and long factors are equal.
    factors = rope.long_factor if seq_len > rope.original_max_position else rope.short_factor
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    return 1.0 / (ext * rope.theta ** (torch.arange(0, rope.dim, 2, dtype=torch.float32, device=device) / rope.dim))


_INV_FREQ: dict[RopeKind, Callable[[RopeSpec, int, torch.device], torch.Tensor]] = {
    RopeKind.DEFAULT: _default_inv_freq,
    RopeKind.LINEAR: _linear_inv_freq,
    RopeKind.DYNAMIC: _dynamic_inv_freq,
    RopeKind.LONGROPE: _longrope_inv_freq,
}


def rope_cos_sin(rope: RopeSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each float32 [T, rope.dim], for the absolute ``positions`` [T] of this forward.

    The frequency choice (dynamic base, long/short factors) depends on the highest position, so one
    forward uses one set for all its tokens. LongRoPE's attention factor multiplies both cos and sin, so
    q.k scales by its square, as in the remote code, transformers and mlx-lm."""
    seq_len = int(positions.max()) + 1
    inv_freq = _INV_FREQ[rope.kind](rope, seq_len, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # rotate-half (NeoX) layout: [f, f]
    scale = rope.attention_factor
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, dim] in float32 and cast back (remote ``apply_rotary_pos_emb``)."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v with grouped KV heads.

    q [B, H, T, d], k [B, KV, S, d], v [B, KV, S, dv] with S >= T: the queries are the last T of the S
    positions, unless ``mask`` (bool [T, S], True where a query sees a key; a static cache's) says which keys
    each sees. Query head h reads KV head h // (H / KV), as transformers' ``repeat_kv``. Returns [B, T, H*dv].
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    t, s = q.shape[2], k.shape[2]
    if mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif t == s or t == 1:  # no cache, or one new token that sees everything: no mask tensor needed
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale)  # [B, H, T, dv]
    else:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], t, -1)


class KVCache:
    """Per-layer keys and values (keys already rotated), so decoding continues a prefill.

    ``length`` is the number of positions seen; the next forward's tokens take positions from there.
    """

    def __init__(self) -> None:
        self.length = 0
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's k, v [B, heads, T, d] for ``layer``; return all of them so far."""
        if layer in self._keys:
            k = torch.cat((self._keys[layer], k), dim=2)
            v = torch.cat((self._values[layer], v), dim=2)
        self._keys[layer], self._values[layer] = k, v
        return k, v

    def mask(self, t: int) -> None:
        """The attention mask for ``t`` new queries: none, the keys returned are exactly those seen so far."""
        return None

    def advance(self, t: int) -> None:
        self.length += t


class StaticKVCache(KVCache):
    """Keys and values in buffers of ``max_length`` positions, written where ``position`` (a device tensor, equal
    to ``length``) says: no shape changes from one decoding step to the next, so a step can be captured as a
    CUDA graph and replayed (``cpmkit.verify.speed``). Attention reads the whole buffer through :meth:`mask`."""

    def __init__(self, max_length: int, device: torch.device) -> None:
        super().__init__()
        self.max_length = max_length
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._slots = torch.arange(max_length, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._keys:
            self._keys[layer] = k.new_zeros((*k.shape[:2], self.max_length, k.shape[3]))
            self._values[layer] = v.new_zeros((*v.shape[:2], self.max_length, v.shape[3]))
        where = self.position + self._slots[: k.shape[2]]
        self._keys[layer].index_copy_(2, where, k)
        self._values[layer].index_copy_(2, where, v)
        return self._keys[layer], self._values[layer]

    def mask(self, t: int) -> torch.Tensor:
        """bool [t, max_length]: query i, at ``position + i``, sees the keys at positions up to its own."""
        return self._slots[None, :] <= (self.position + self._slots[:t])[:, None]

    def advance(self, t: int) -> None:
        if self.length + t > self.max_length:
            raise ValueError(f"static KV cache of {self.max_length} positions is full")
        self.length += t
        self.position.fill_(self.length)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and RoPE on the whole head (MiniCPM 1/2/4, MiniCPM5)."""

    def __init__(self, layer: int, hidden: int, heads: int, kv_heads: int, head_dim: int, linear: Linear):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        self.q_proj = linear("q_proj", hidden, heads * head_dim)
        self.k_proj = linear("k_proj", hidden, kv_heads * head_dim)
        self.v_proj = linear("v_proj", hidden, kv_heads * head_dim)
        self.o_proj = linear("o_proj", heads * head_dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = fused_forward(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            mask = cache.mask(t)
        return self.o_proj(causal_attention(q, k, v, self.head_dim**-0.5, mask))


def dense_attention(spec: ModelSpec, layer: int, linear: Linear) -> Attention:
    return Attention(layer, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, linear)


def _fatrelu(threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    # MiniCPM-S: the gate passes where gate > threshold, else 0 (vLLM FatreluAndMul: F.threshold(x, t, 0)).
    return partial(F.threshold, threshold=threshold, value=0.0)


_ACTIVATIONS: dict[Activation, Callable[[float], Callable[[torch.Tensor], torch.Tensor]]] = {
    Activation.SILU: lambda threshold: F.silu,
    Activation.FATRELU: _fatrelu,
}


def activation_fn(activation: Activation, threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return _ACTIVATIONS[activation](threshold)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)). The HF names differ by family (gate/up/down_proj, or MoE experts'
    w1/w3/w2), so they are passed in."""

    def __init__(self, hidden: int, intermediate: int, act: Callable[[torch.Tensor], torch.Tensor],
                 linear: Linear, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.act = act
        self._names = names
        for name, (i, o) in zip(names, ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))):
            setattr(self, name, linear(name, i, o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        g, u = fused_forward(x, gate, up)
        return down(self.act(g) * u)


class DecoderLayer(nn.Module):
    """Pre-norm block; each branch output is scaled by ``residual_scale`` (scale_depth/sqrt(L) for MiniCPM's
    muP, 1 for Llama) before it joins the residual stream."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float, residual_scale: float,
                 dtype: torch.dtype):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps, dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype)
        self.residual_scale = residual_scale

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache) * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
