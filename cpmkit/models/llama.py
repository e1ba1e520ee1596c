"""LlamaForCausalLM reference, for MiniCPM5 (ARCHITECTURES.md §2.6): plain Llama, no muP, an untied head
and an explicit ``head_dim`` (128 with hidden 1536 / 16 heads), so q_proj and o_proj are not square.
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


def _mlp(spec: ModelSpec, layer: int, linear: Linear) -> nn.Module:
    return GatedMLP(spec.hidden_size, spec.intermediate_size, activation_fn(spec.activation, 0.0), linear)


class Model(CausalLM):
    def __init__(self, spec: ModelSpec, *, linear_factory: LinearFactory | None = None,
                 dtype: torch.dtype = torch.float32, weight_dtype: torch.dtype | None = None):
        super().__init__(spec, attention=dense_attention, mlp=_mlp, scales=Scales(), linear_factory=linear_factory,
                         dtype=dtype, weight_dtype=weight_dtype)
