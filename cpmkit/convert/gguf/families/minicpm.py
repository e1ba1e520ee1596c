"""MiniCPMForCausalLM -> GGUF arch ``minicpm`` (llama.cpp conversion/minicpm.py ``MiniCPMModel``): MiniCPM
1B/2B/2B-128k, MiniCPM4/4.1, BitCPM4 and MiniCPM-MoE.

Beyond the converter: MiniCPM-MoE's per-expert ``mlp.experts.{e}.w1/w3/w2`` (which llama.cpp's converter
cannot map) are merged into ``ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps`` [expert, out, in], the
layout ``llama_model_minicpm::load_arch_tensors`` loads, with the router as ``ffn_gate_inp``; and a
LongRoPE config whose max_position_embeddings differs from the original gets the context and attention
factor keys (``longrope_context_keys``) so llama.cpp computes what the checkpoint's code computes.
"""

from __future__ import annotations

import math
from typing import Any

from gguf import Keys

from cpmkit.convert.gguf.families import (
    DENSE_TENSOR_NAMES,
    PERMUTED_QK,
    GGUFFamily,
    config_from_gguf,
    longrope_context_keys,
    register,
    text_model_parameters,
)
from cpmkit.formats.gguf.file import GGUFContents
from cpmkit.formats.gguf.vocab import add_sentencepiece_vocab
from cpmkit.spec import Family, ModelSpec

TENSOR_NAMES: dict[str, str | None] = {
    **DENSE_TENSOR_NAMES,
    "model.layers.{bid}.mlp.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.layers.{bid}.mlp.experts.{xid}.w1.weight": "blk.{bid}.ffn_gate_exps.weight",
    "model.layers.{bid}.mlp.experts.{xid}.w3.weight": "blk.{bid}.ffn_up_exps.weight",
    "model.layers.{bid}.mlp.experts.{xid}.w2.weight": "blk.{bid}.ffn_down_exps.weight",
}


def parameters(spec: ModelSpec, config: dict[str, Any], file_type: int) -> list[tuple[str, Any]]:
    """``MiniCPMModel.set_gguf_parameters``: the base keys, then the three muP scalars (all three always:
    llama.cpp's fallbacks for missing ones invert the logit scale)."""
    assert spec.mup is not None
    return [
        *text_model_parameters(spec, config, file_type),
        (Keys.LLM.EMBEDDING_SCALE, float(spec.mup.scale_emb)),
        # the converter's own expression (``** 0.5``), so the float32 stored is the same
        (Keys.LLM.RESIDUAL_SCALE, spec.mup.scale_depth / spec.num_layers ** 0.5),
        (Keys.LLM.LOGIT_SCALE, spec.hidden_size / spec.mup.dim_model_base),
        *longrope_context_keys(spec),
    ]


def read_config(contents: GGUFContents) -> dict[str, Any]:
    """The muP scalars as llama.cpp reads them (``llama_model_minicpm::load_arch_hparams``: each key
    optional, falling back to 12, 1.4/sqrt(L) and 256/hidden) and the expert counts."""
    config = config_from_gguf(contents, "MiniCPMForCausalLM")
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    residual = contents.arch_value(Keys.LLM.RESIDUAL_SCALE, 1.4 / math.sqrt(layers))
    logit_scale = contents.arch_value(Keys.LLM.LOGIT_SCALE, 256.0 / hidden)
    config.update(scale_emb=contents.arch_value(Keys.LLM.EMBEDDING_SCALE, 12.0),
                  scale_depth=residual * math.sqrt(layers), dim_model_base=hidden / logit_scale,
                  num_experts=contents.arch_value(Keys.LLM.EXPERT_COUNT, 0),
                  num_experts_per_tok=contents.arch_value(Keys.LLM.EXPERT_USED_COUNT, 0))
    return config


MINICPM = register(Family.MINICPM, GGUFFamily(arch="minicpm", tensor_names=TENSOR_NAMES, permuted=PERMUTED_QK,
                                              parameters=parameters, add_vocab=add_sentencepiece_vocab,
                                              read_config=read_config))
