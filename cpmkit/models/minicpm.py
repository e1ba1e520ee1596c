"""MiniCPMForCausalLM reference: MiniCPM 1B/2B/2B-128k, MiniCPM4/4.1, BitCPM4, MiniCPM-S (fatrelu) and
MiniCPM-MoE-8x2B.

Llama layers plus muP at run time (ARCHITECTURES.md §2.1): the embedding output is multiplied by
scale_emb, each attention/MLP branch by scale_depth/sqrt(L), and the final hidden state divided by
hidden/dim_model_base before lm_head, tied or not (the remote code always divides; mlx-lm skips the
division when ``tie_word_embeddings`` is true).
"""

from __future__ import annotations

import torch
from torch import nn

from cpmkit.models.causal_lm import CausalLM, Scales
from cpmkit.models.layers import (
    GatedMLP,
    Linear,
    LinearFactory,
    activation_fn,
    dense_attention,
)
from cpmkit.spec import ModelSpec

EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down (Mixtral-style names under mlp.experts.{e})


class MoE(nn.Module):
    """MiniCPM-MoE's sparse MLP: ``gate`` is the router; softmax over all experts in float32, keep the
    top k, renormalise them to sum to 1, and sum the chosen experts' outputs with those weights (vLLM
    ``fused_topk(renormalize=True)``; no shared expert, no bias)."""

    def __init__(self, spec: ModelSpec, linear: Linear):
        super().__init__()
        assert spec.moe is not None
        self.top_k = spec.moe.top_k
        self.gate = linear("gate", spec.hidden_size, spec.moe.num_experts)
        act = activation_fn(spec.activation, spec.activation_threshold)

        def expert(e: int) -> GatedMLP:
            return GatedMLP(spec.hidden_size, spec.intermediate_size, act,
                            lambda name, i, o: linear(f"experts.{e}.{name}", i, o), EXPERT_NAMES)

        self.experts = nn.ModuleList(expert(e) for e in range(spec.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        probs = torch.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        # One pass per expert over the tokens routed to it (out-of-place index_add keeps autograd intact).
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(x)


def _mlp(spec: ModelSpec, layer: int, linear: Linear) -> nn.Module:
    if spec.moe is not None:
        return MoE(spec, linear)
    return GatedMLP(spec.hidden_size, spec.intermediate_size,
                    activation_fn(spec.activation, spec.activation_threshold), linear)


class Model(CausalLM):
    def __init__(self, spec: ModelSpec, *, linear_factory: LinearFactory | None = None,
                 dtype: torch.dtype = torch.float32, weight_dtype: torch.dtype | None = None):
        assert spec.mup is not None
        scales = Scales.from_spec(spec)
        super().__init__(spec, attention=dense_attention, mlp=_mlp, scales=scales, linear_factory=linear_factory,
                         dtype=dtype, weight_dtype=weight_dtype)
