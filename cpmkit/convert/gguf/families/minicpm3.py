"""MiniCPM3ForCausalLM -> GGUF arch ``minicpm3`` (llama.cpp conversion/minicpm.py ``MiniCPM3Model``).

Multi-head latent attention; no q/k permutation (llama.cpp runs minicpm3 with NEOX rope, HF's layout) and
no muP keys: ``llama_model_minicpm3`` hard-codes scale_emb 12, scale_depth 1.4 and dim_model_base 256, so
checkpoints with other values are refused (``convert.targets``). Beyond the converter, so that llama.cpp runs
what the checkpoint's code runs: a rope_theta other than llama.cpp's default 10000 is written (the converter
drops it), and as for ``minicpm``, LongRoPE configs whose max_position_embeddings differs from the original
get the context and attention factor keys.
"""

from __future__ import annotations

from typing import Any

from gguf import Keys

from cpmkit.convert.gguf.capability import LLAMA_CPP_MINICPM3_MUP
from cpmkit.convert.gguf.families import (
    DENSE_TENSOR_NAMES,
    LLAMA_CPP_ROPE_THETA,
    GGUFFamily,
    config_from_gguf,
    longrope_context_keys,
    register,
)
from cpmkit.formats.gguf.file import GGUFContents
from cpmkit.formats.gguf.vocab import add_sentencepiece_vocab
from cpmkit.spec import Family, ModelSpec

_MLA_NAMES = {
    "q_a_proj.weight": "attn_q_a.weight",
    "q_a_layernorm.weight": "attn_q_a_norm.weight",
    "q_b_proj.weight": "attn_q_b.weight",
    "kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "kv_b_proj.weight": "attn_kv_b.weight",
}
TENSOR_NAMES: dict[str, str | None] = {
    **{hf: gguf for hf, gguf in DENSE_TENSOR_NAMES.items()
       if not hf.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))},  # MLA replaces q/k/v
    **{f"model.layers.{{bid}}.self_attn.{hf}": f"blk.{{bid}}.{gguf}" for hf, gguf in _MLA_NAMES.items()},
}


def parameters(spec: ModelSpec, config: dict[str, Any], file_type: int) -> list[tuple[str, Any]]:
    """``MiniCPM3Model.set_gguf_parameters`` (it does not call the base class)."""
    m = spec.mla
    assert m is not None
    out: list[tuple[str, Any]] = [
        (Keys.General.FILE_TYPE, file_type),
        (Keys.LLM.CONTEXT_LENGTH, config["max_position_embeddings"]),
        (Keys.LLM.EMBEDDING_LENGTH, config["hidden_size"]),
        (Keys.LLM.BLOCK_COUNT, spec.num_layers),
        (Keys.LLM.FEED_FORWARD_LENGTH, config["intermediate_size"]),
        (Keys.Attention.HEAD_COUNT, config["num_attention_heads"]),
        (Keys.Attention.HEAD_COUNT_KV, config["num_key_value_heads"]),
        (Keys.Attention.LAYERNORM_RMS_EPS, config["rms_norm_eps"]),
        (Keys.LLM.VOCAB_SIZE, config["vocab_size"]),
    ]
    if config.get("q_lora_rank") is not None:
        out.append((Keys.Attention.Q_LORA_RANK, config["q_lora_rank"]))
    out += [
        (Keys.Attention.KV_LORA_RANK, m.kv_lora_rank),
        (Keys.Attention.KEY_LENGTH, m.qk_head_dim),
        (Keys.Rope.DIMENSION_COUNT, m.qk_rope_head_dim),
    ]
    if spec.rope.theta != LLAMA_CPP_ROPE_THETA:
        out.append((Keys.Rope.FREQ_BASE, spec.rope.theta))
    return out + longrope_context_keys(spec)


def read_config(contents: GGUFContents) -> dict[str, Any]:
    """MLA dimensions from the file; the muP scalars llama.cpp hard-codes (src/models/minicpm3.cpp)."""
    config = config_from_gguf(contents, "MiniCPM3ForCausalLM")
    rope_dim = contents.arch_value(Keys.Rope.DIMENSION_COUNT)
    scale_emb, scale_depth, dim_model_base = LLAMA_CPP_MINICPM3_MUP
    config.update(q_lora_rank=contents.arch_value(Keys.Attention.Q_LORA_RANK),
                  kv_lora_rank=contents.arch_value(Keys.Attention.KV_LORA_RANK), qk_rope_head_dim=rope_dim,
                  qk_nope_head_dim=contents.arch_value(Keys.Attention.KEY_LENGTH) - rope_dim,
                  scale_emb=scale_emb, scale_depth=scale_depth, dim_model_base=dim_model_base)
    return config


MINICPM3 = register(Family.MINICPM3, GGUFFamily(arch="minicpm3", tensor_names=TENSOR_NAMES, permuted={},
                                                parameters=parameters, add_vocab=add_sentencepiece_vocab,
                                                read_config=read_config))
