"""MiniCPM3ForCausalLM reference: multi-head latent attention (ARCHITECTURES.md §2.3) with MiniCPM's muP.

Queries go through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj); keys and values come from one
compressed latent (kv_a_proj_with_mqa -> RMSNorm -> kv_b_proj) plus a single shared rotary key part.
RoPE is the rotate-half kind on the qk_rope_head_dim part only (not DeepSeek's interleaved variant), and
the softmax scale is (qk_nope + qk_rope)^-0.5 with no mscale. The latent norms use eps 1e-6 (the remote
code's constructor default; vLLM and mlx-lm use other values).
"""

from __future__ import annotations

import torch
from torch import nn

from cpmkit.kernels.linear import fused_forward
from cpmkit.models.causal_lm import CausalLM, Scales
from cpmkit.models.layers import (
    GatedMLP,
    KVCache,
    Linear,
    LinearFactory,
    RMSNorm,
    activation_fn,
    apply_rope,
    causal_attention,
)
from cpmkit.spec import ModelSpec


class MLAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, linear: Linear, dtype: torch.dtype):
        super().__init__()
        m = spec.mla
        assert m is not None
        self.layer, self.heads, self.mla = layer, spec.num_heads, m
        self.q_a_proj = linear("q_a_proj", spec.hidden_size, m.q_lora_rank)
        self.q_a_layernorm = RMSNorm(m.q_lora_rank, m.latent_norm_eps, dtype)
        self.q_b_proj = linear("q_b_proj", m.q_lora_rank, spec.num_heads * m.qk_head_dim)
        self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", spec.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, m.latent_norm_eps, dtype)
        self.kv_b_proj = linear("kv_b_proj", m.kv_lora_rank, spec.num_heads * (m.qk_nope_head_dim + m.v_head_dim))
        self.o_proj = linear("o_proj", spec.num_heads * m.v_head_dim, spec.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        m = self.mla
        q_a, kv_a = fused_forward(x, self.q_a_proj, self.kv_a_proj_with_mqa)  # both read x
        q = self.q_b_proj(self.q_a_layernorm(q_a)).view(b, t, self.heads, m.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)

        latent, k_rope = kv_a.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, t, self.heads, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_rope = k_rope.view(b, 1, t, m.qk_rope_head_dim)  # one rotary key shared by all heads

        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(b, self.heads, t, m.qk_rope_head_dim)), dim=-1)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            mask = cache.mask(t)
        return self.o_proj(causal_attention(q, k, v, m.qk_head_dim**-0.5, mask))


class Model(CausalLM):
    def __init__(self, spec: ModelSpec, *, linear_factory: LinearFactory | None = None,
                 dtype: torch.dtype = torch.float32, weight_dtype: torch.dtype | None = None):
        assert spec.mup is not None
        scales = Scales.from_spec(spec)
        super().__init__(spec, scales=scales, linear_factory=linear_factory, dtype=dtype, weight_dtype=weight_dtype,
                         attention=lambda s, i, linear: MLAttention(s, i, linear, weight_dtype or dtype),
                         mlp=lambda s, i, linear: GatedMLP(s.hidden_size, s.intermediate_size,
                                                           activation_fn(s.activation, 0.0), linear))
