"""Which linears of a decoder block are quantized, and in which order, per family: data for GPTQ's
true-sequential order (each stage sees the inputs the already-quantized earlier stages produce) and for AWQ's
scaling groups (which norm or linear feeds which linears). Names are relative to the block
(``self_attn.q_proj``, ``mlp.experts.3.w1``); the MoE router (``mlp.gate``) is never quantized, as no runtime
quantizes it.

GPTQ stage order follows AutoGPTQ's per-model ``inside_layer_modules`` (``modeling/llama.py``,
``minicpm3.py``); MoE experts follow the dense MLP's order, one stage per projection across all experts.
AWQ groups follow AutoAWQ's ``get_layers_for_scaling`` (``awq/models/llama.py``, ``minicpm.py``,
``minicpm3.py``, ../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §3.4).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpmkit.models.minicpm import EXPERT_NAMES
from cpmkit.spec import ModelSpec

DENSE_ATTENTION = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
MLA_ATTENTION = [["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"], ["self_attn.q_b_proj", "self_attn.kv_b_proj"],
                 ["self_attn.o_proj"]]
DENSE_MLP = [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _attention(spec: ModelSpec) -> list[list[str]]:
    return MLA_ATTENTION if spec.mla is not None else DENSE_ATTENTION


def _mlp(spec: ModelSpec) -> list[list[str]]:
    if spec.moe is None:
        return DENSE_MLP
    gate, up, down = EXPERT_NAMES
    experts = range(spec.moe.num_experts)
    return [[f"mlp.experts.{e}.{n}" for e in experts for n in (gate, up)], [f"mlp.experts.{e}.{down}" for e in experts]]


def quantization_stages(spec: ModelSpec) -> list[list[str]]:
    """The block's quantized linears in GPTQ's true-sequential stages."""
    return _attention(spec) + _mlp(spec)


def quantized_linears(spec: ModelSpec) -> list[str]:
    return [name for stage in quantization_stages(spec) for name in stage]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, scaled together: the input's per-channel scale is divided out of
    ``previous`` (a norm's weight, or the rows of a linear that produces the input) and multiplied into each
    of ``linears``. ``inspect`` is the module whose output measures the loss of a candidate scale (it runs
    on the same input)."""

    previous: str
    linears: tuple[str, ...]
    inspect: str


def awq_groups(spec: ModelSpec) -> list[ScaleGroup]:
    """AWQ's scaling groups of one block. v -> o only where v_proj's output is o_proj's input row for row (no
    GQA), which no MiniCPM with grouped KV heads allows; MLA's o_proj and the MoE router stay unscaled."""
    groups = []
    if spec.mla is not None:
        # AutoAWQ's MiniCPM3 leaves q_a/kv_a unscaled; the input norm feeds both exactly like q/k/v elsewhere
        groups += [ScaleGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn"),
                   ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn.q_b_proj"),
                   ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj")]
    else:
        groups.append(ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                 "self_attn"))
        if spec.num_kv_heads == spec.num_heads:
            groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    if spec.moe is None:
        groups += [ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                   ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]
    else:
        gate, up, down = EXPERT_NAMES
        experts = range(spec.moe.num_experts)
        groups.append(ScaleGroup("post_attention_layernorm",
                                 tuple(f"mlp.experts.{e}.{n}" for e in experts for n in (gate, up)), "mlp"))
        groups += [ScaleGroup(f"mlp.experts.{e}.{up}", (f"mlp.experts.{e}.{down}",), f"mlp.experts.{e}.{down}")
                   for e in experts]
    return groups
