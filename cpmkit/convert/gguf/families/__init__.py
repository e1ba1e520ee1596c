"""What each checkpoint family becomes in GGUF: architecture, tensor names, metadata, q/k permutation.

One module per family (``minicpm``, ``minicpm3``, ``llama``) registers a :class:`GGUFFamily`: its HF -> GGUF
tensor name map as data (``{bid}`` = layer, ``{xid}`` = expert, merged into one 3-D tensor; ``None`` =
dropped), the heads each permuted tensor is split into, its ``set_gguf_parameters`` keys and its vocabulary.
The shared pieces mirror llama.cpp's converter (conversion/base.py ``TextModel``, conversion/llama.py
``LlamaModel.permute``), checked at llama.cpp 4df29be4f.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from gguf import Keys

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.file import GGUFContents, Metadata
from cpmkit.spec import Family, ModelSpec

# (spec, config.json, file type id) -> the family's set_gguf_parameters keys, in order
Parameters = Callable[[ModelSpec, dict[str, Any], int], list[tuple[str, Any]]]
VocabWriter = Callable[[Metadata, Path, dict[str, Any]], None]
# a GGUF file -> the config.json of the model llama.cpp runs from it
ConfigReader = Callable[[GGUFContents], dict[str, Any]]

LLAMA_CPP_ROPE_THETA = 10000.0  # llama_model::load_hparams' rope_freq_base_train when the file has none


@dataclass(frozen=True)
class MappedName:
    gguf: str
    expert: int | None  # set for a tensor merged with its siblings into ``gguf`` along a new first axis


@dataclass(frozen=True)
class GGUFFamily:
    arch: str  # general.architecture
    tensor_names: dict[str, str | None]
    permuted: dict[str, Callable[[ModelSpec], int]]  # HF template -> heads its rows are permuted within
    parameters: Parameters
    add_vocab: VocabWriter
    read_config: ConfigReader
    _patterns: list[tuple[re.Pattern, str | None]] = field(init=False, repr=False, compare=False)
    _reverse: list[tuple[re.Pattern, str]] = field(init=False, repr=False, compare=False)
    _permuted: list[tuple[re.Pattern, Callable[[ModelSpec], int]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patterns", [(_template_regex(hf), gguf) for hf, gguf in self.tensor_names.items()])
        object.__setattr__(self, "_reverse", [(_template_regex(gguf), hf) for hf, gguf in self.tensor_names.items()
                                              if gguf is not None])
        object.__setattr__(self, "_permuted", [(_template_regex(hf), heads) for hf, heads in self.permuted.items()])

    def map_name(self, hf_name: str) -> MappedName | None:
        """The GGUF name of a checkpoint tensor, or None for a tensor llama.cpp does not use."""
        for pattern, gguf in self._patterns:
            m = pattern.fullmatch(hf_name)
            if m:
                if gguf is None:
                    return None
                ids = {k: int(v) for k, v in m.groupdict().items()}
                return MappedName(gguf.format(bid=ids.get("bid")), ids.get("xid"))
        raise CpmkitError(f"{hf_name}: no GGUF name for this tensor of a {self.arch} checkpoint")

    def hf_names(self, gguf_name: str, n_expert: int) -> list[str] | None:
        """The checkpoint tensors GGUF tensor ``gguf_name`` holds: one, or ``n_expert`` for merged experts;
        None for a tensor without a checkpoint counterpart (the LongRoPE factors)."""
        for pattern, hf in self._reverse:
            m = pattern.fullmatch(gguf_name)
            if m:
                bid = m.groupdict().get("bid")
                if "{xid}" in hf:
                    return [hf.format(bid=bid, xid=e) for e in range(n_expert)]
                return [hf.format(bid=bid)]
        return None

    def permute_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        """Heads whose rows ``hf_name`` permutes (HF rotate-half -> llama.cpp interleaved pairs), if any."""
        return next((heads(spec) for pattern, heads in self._permuted if pattern.fullmatch(hf_name)), None)


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{bid\}|\{xid\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>\\d+)" if p in ("{bid}", "{xid}") else re.escape(p) for p in parts))


FAMILIES: dict[Family, GGUFFamily] = {}


def register(family: Family, gguf_family: GGUFFamily) -> GGUFFamily:
    assert family not in FAMILIES, family
    FAMILIES[family] = gguf_family
    return gguf_family


def gguf_family(spec: ModelSpec) -> GGUFFamily:
    from cpmkit.convert.gguf.families import llama, minicpm, minicpm3  # noqa: F401  (each registers itself)

    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise CpmkitError(f"{spec.architecture}: no GGUF conversion for family {spec.family.value}; supported: "
                          f"{', '.join(f.value for f in FAMILIES)}") from None


def family_for_arch(arch: str) -> GGUFFamily:
    from cpmkit.convert.gguf.families import llama, minicpm, minicpm3  # noqa: F401

    for gf in FAMILIES.values():
        if gf.arch == arch:
            return gf
    raise CpmkitError(f"GGUF architecture {arch!r} is not one cpmkit runs; supported: "
                      f"{', '.join(gf.arch for gf in FAMILIES.values())}")


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """``LlamaModel.permute``: within each head, rows [first half | second half] (HF rotate-half) become
    interleaved pairs (llama.cpp LLAMA_ROPE_TYPE_NORM): new row 2i+j <- old row j*d/2 + i."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rows`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Standard Llama/MiniCPM tensor names (gguf-py tensor_mapping.py), shared by the dense families.
DENSE_TENSOR_NAMES: dict[str, str | None] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    # prepare_tensors skips these rotary caches of old .bin checkpoints
    "model.layers.{bid}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{bid}.self_attn.rotary_emb.cos_cached": None,
    "model.layers.{bid}.self_attn.rotary_emb.sin_cached": None,
}

PERMUTED_QK: dict[str, Callable[[ModelSpec], int]] = {
    "model.layers.{bid}.self_attn.q_proj.weight": lambda s: s.num_heads,
    "model.layers.{bid}.self_attn.k_proj.weight": lambda s: s.num_kv_heads,
}


def find_hparam(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """``ModelBase.find_hparam(keys, optional=True)``: the value of the first key present."""
    return next((config[k] for k in keys if k in config), None)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """``TextModel.__init__``'s rope_parameters: ``rope_parameters`` or ``rope_scaling``, with the global
    rope_theta and the legacy ``type`` mirrored in."""
    params = dict(config.get("rope_parameters", config.get("rope_scaling")) or {})
    theta = find_hparam(config, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                 "rotary_emb_base"))
    if "rope_theta" not in params and theta is not None:
        params["rope_theta"] = theta
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


# rope_type -> how TextModel.set_gguf_parameters writes it; "dynamic" and "default" write nothing
_ROPE_SCALING_TYPES = {"linear": "linear", "su": "longrope", "longrope": "longrope"}


def text_model_parameters(spec: ModelSpec, config: dict[str, Any], file_type: int) -> list[tuple[str, Any]]:
    """``TextModel.set_gguf_parameters``: the keys it writes for a MiniCPM/Llama config, in its order."""
    out: list[tuple[str, Any]] = [(Keys.LLM.BLOCK_COUNT, spec.num_layers)]
    for key, names in ((Keys.LLM.CONTEXT_LENGTH, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                                  "max_sequence_length", "model_max_length")),
                       (Keys.LLM.EMBEDDING_LENGTH, ("hidden_size", "n_embd", "dim")),
                       (Keys.LLM.FEED_FORWARD_LENGTH, ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                                       "intermediate_size", "n_inner", "hidden_dim")),
                       (Keys.Attention.HEAD_COUNT, ("num_attention_heads", "n_head", "n_heads")),
                       (Keys.Attention.HEAD_COUNT_KV, ("num_key_value_heads", "n_kv_heads"))):
        value = find_hparam(config, names)
        if value is not None:
            out.append((key, value))
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type")
    if rope_type == "yarn":
        raise CpmkitError(f"{spec.architecture}: yarn rope scaling is not supported")
    if rope_type in _ROPE_SCALING_TYPES and (rope_type != "linear" or rope.get("factor") is not None):
        out.append((Keys.Rope.SCALING_TYPE, _ROPE_SCALING_TYPES[rope_type]))
        if rope_type == "linear":
            out.append((Keys.Rope.SCALING_FACTOR, rope["factor"]))
    if rope.get("rope_theta") is not None:
        out.append((Keys.Rope.FREQ_BASE, rope["rope_theta"]))
    eps = find_hparam(config, ("rms_norm_eps", "norm_eps"))
    if eps is not None:
        out.append((Keys.Attention.LAYERNORM_RMS_EPS, eps))
    experts = find_hparam(config, ("num_local_experts", "num_experts", "n_routed_experts"))
    if experts is not None:
        out.append((Keys.LLM.EXPERT_COUNT, experts))
    used = find_hparam(config, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))
    if used is not None:
        out.append((Keys.LLM.EXPERT_USED_COUNT, used))
    if config.get("head_dim") is not None:
        out += [(Keys.Attention.KEY_LENGTH, config["head_dim"]), (Keys.Attention.VALUE_LENGTH, config["head_dim"])]
    out.append((Keys.General.FILE_TYPE, file_type))
    return out


def longrope_context_keys(spec: ModelSpec) -> list[tuple[str, Any]]:
    """Keys llama.cpp's converter omits for LongRoPE, written when max_position_embeddings differs from
    original_max_position_embeddings: llama.cpp then picks long factors for contexts longer than the
    original (``llama_model::get_rope_factors``) and scales cos/sin by the attention factor
    (``cparams.yarn_attn_factor *= rope_attn_factor``), as the checkpoint's own code does."""
    rope = spec.rope
    if rope.long_factor is None or rope.original_max_position in (None, rope.max_position):
        return []
    return [(Keys.Rope.SCALING_ORIG_CTX_LEN, rope.original_max_position),
            (Keys.Rope.SCALING_ATTN_FACTOR, rope.attention_factor)]


def config_from_gguf(contents: GGUFContents, architecture: str) -> dict[str, Any]:
    """The config.json keys every family reads back from a GGUF file, with llama.cpp's defaults for keys a
    file may lack (llama_model::load_hparams)."""
    hidden = contents.arch_value(Keys.LLM.EMBEDDING_LENGTH)
    heads = contents.arch_value(Keys.Attention.HEAD_COUNT)
    config = {
        "architectures": [architecture],
        "hidden_size": hidden,
        "intermediate_size": contents.arch_value(Keys.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": contents.arch_value(Keys.LLM.BLOCK_COUNT),
        "num_attention_heads": heads,
        "num_key_value_heads": contents.arch_value(Keys.Attention.HEAD_COUNT_KV, heads),
        "vocab_size": len(contents.metadata.get(Keys.Tokenizer.LIST, ())) or contents.arch_value(Keys.LLM.VOCAB_SIZE),
        "rms_norm_eps": contents.arch_value(Keys.Attention.LAYERNORM_RMS_EPS),
        "max_position_embeddings": contents.arch_value(Keys.LLM.CONTEXT_LENGTH),
        "rope_theta": contents.arch_value(Keys.Rope.FREQ_BASE, LLAMA_CPP_ROPE_THETA),
        "tie_word_embeddings": "output.weight" not in contents.tensors,
        "bos_token_id": contents.metadata.get(Keys.Tokenizer.BOS_ID),
        "eos_token_id": contents.metadata.get(Keys.Tokenizer.EOS_ID),
        "rope_scaling": rope_scaling_from_gguf(contents),
    }
    missing = [k for k, v in config.items() if v is None and k not in ("bos_token_id", "eos_token_id", "rope_scaling")]
    if missing:
        raise CpmkitError(f"{contents.path}: no {contents.architecture} key for {missing[0]}; not a model llama.cpp "
                          "can load")
    return config



def rope_scaling_from_gguf(contents: GGUFContents) -> dict[str, Any] | None:
    """LongRoPE when the file has factor tensors llama.cpp uses (``get_rope_factors``), linear when it has a
    scaling factor."""
    scaling = contents.arch_value(Keys.Rope.SCALING_TYPE)
    factors = {k: contents.tensors.get(f"rope_factors_{k}.weight") for k in ("long", "short")}
    uses_factors = contents.architecture == "minicpm3" or scaling == "longrope"
    if uses_factors and all(t is not None for t in factors.values()):
        ctx = contents.arch_value(Keys.LLM.CONTEXT_LENGTH)
        return {"rope_type": "longrope",
                "long_factor": factors["long"].raw.view("<f4").tolist(),
                "short_factor": factors["short"].raw.view("<f4").tolist(),
                "original_max_position_embeddings": contents.arch_value(Keys.Rope.SCALING_ORIG_CTX_LEN, ctx)}
    factor = contents.arch_value(Keys.Rope.SCALING_FACTOR)
    if scaling in (None, "linear") and factor:
        return {"type": "linear", "factor": factor}
    return None


def rope_factor_tensors(spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """``generate_extra_tensors`` of MiniCPM/MiniCPM3: the LongRoPE factors as float32 vectors."""
    rope = spec.rope
    if rope.long_factor is None:
        return []
    return [("rope_factors_long.weight", torch.tensor(rope.long_factor, dtype=torch.float32)),
            ("rope_factors_short.weight", torch.tensor(rope.short_factor, dtype=torch.float32))]
