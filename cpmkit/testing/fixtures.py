"""Tiny checkpoints of every MiniCPM family, written the way the real repos are: the real config keys
(in the official files' order and with their omissions), the real tensor names, a real tokenizer, and
single-file safetensors, sharded safetensors with an index, or pytorch_model.bin.

Dimensions are small but keep the properties converters trip on: vocabularies that are not multiples of
64, an FFN width that is not a multiple of 256 (like MiniCPM-2B's 5760), GQA, MiniCPM5's head_dim that
differs from hidden/heads, LongRoPE factor lists of rotary_dim/2 entries.
"""

from __future__ import annotations

import json
import math
import shutil
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch

from cpmkit.formats.safetensors import StreamingWriter
from cpmkit.spec import ModelSpec, read_spec

DATA = Path(__file__).parent / "data"
SP_VOCAB = 997  # pieces in data/tokenizer.model
BPE_VOCAB = 1000  # tokens in data/bpe_tokenizer.json
CHATML = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
          "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
_AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}


class Layout(str, Enum):
    SAFETENSORS = "safetensors"  # model.safetensors
    SHARDED = "sharded"  # model-0000i-of-0000n.safetensors + model.safetensors.index.json
    BIN = "bin"  # pytorch_model.bin


class Ternary(str, Enum):
    """Scale granularity of a BitCPM-style fake-quantized checkpoint."""

    TENSOR = "tensor"
    ROW = "row"
    GROUP32 = "group32"
    GROUP64 = "group64"
    GROUP128 = "group128"


def longrope_factors(n: int, top: float = 16.0) -> list[float]:
    """A smooth rising factor list like the released ones (1 at high frequency, `top` at low)."""
    return [1.0 + (top - 1.0) * (i / (n - 1)) ** 2 for i in range(n)]


def _minicpm_2b() -> dict[str, Any]:
    # MiniCPM-2B-sft-bf16's file: no model_type, rope_theta or tie_word_embeddings (so: theta 1e4, tied)
    return {"_name_or_path": "openbmb/CPM-2B", "architectures": ["MiniCPMForCausalLM"], "auto_map": _AUTO_MAP,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 256,
            "initializer_range": 0.1, "intermediate_size": 640, "max_position_embeddings": 4096,
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "rms_norm_eps": 1e-05,
            "rope_scaling": None, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
            "vocab_size": SP_VOCAB, "scale_emb": 12, "dim_model_base": 64, "scale_depth": 1.4}


def _minicpm_1b() -> dict[str, Any]:
    return {**_minicpm_2b(), "num_key_value_heads": 2, "num_hidden_layers": 3}


def _minicpm_2b_128k() -> dict[str, Any]:
    c = {**_minicpm_2b(), "model_type": "minicpm", "max_position_embeddings": 65536, "num_experts": 0,
         "num_experts_per_tok": 0, "rope_scaling": {"factor": 4.0, "type": "dynamic"}, "rope_theta": 1000000.0,
         "tie_word_embeddings": False, "vocab_size": SP_VOCAB + 7, "transformers_version": "4.40.0"}
    c["_name_or_path"] = "openbmb/MiniCPM-2B-128k"
    return c


def _minicpm_s() -> dict[str, Any]:
    return {**_minicpm_1b(), "model_type": "minicpm", "hidden_act": "fatrelu", "hidden_act_param": 0.03,
            "rope_theta": 10000.0}


def _minicpm_moe() -> dict[str, Any]:
    return {**_minicpm_2b(), "model_type": "minicpm", "intermediate_size": 256, "num_experts": 8,
            "num_experts_per_tok": 2, "rope_theta": 10000.0}


def _minicpm4() -> dict[str, Any]:
    # MiniCPM4-8B's keys: untied, LongRoPE with rotary_dim/2 factors, eps 1e-6, eos list
    return {"_name_or_path": "openbmb/MiniCPM4-8B", "architectures": ["MiniCPMForCausalLM"], "auto_map": _AUTO_MAP,
            "bos_token_id": 1, "eos_token_id": [2, SP_VOCAB], "pad_token_id": 2, "hidden_act": "silu",
            "hidden_size": 256, "initializer_range": 0.1, "intermediate_size": 768, "max_position_embeddings": 32768,
            "model_type": "minicpm", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"rope_type": "longrope", "long_factor": longrope_factors(32),
                             "short_factor": longrope_factors(32), "original_max_position_embeddings": 32768},
            "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": True,
            "vocab_size": SP_VOCAB + len(CHATML), "scale_emb": 12, "dim_model_base": 64, "scale_depth": 1.4,
            "mup_denominator": 32, "tie_word_embeddings": False, "rope_theta": 10000.0}


def _minicpm4_05b() -> dict[str, Any]:
    # MiniCPM4-0.5B omits tie_word_embeddings (tied by default), mup_denominator and pad_token_id
    c = {k: v for k, v in _minicpm4().items() if k not in ("tie_word_embeddings", "mup_denominator", "pad_token_id")}
    c["_name_or_path"] = "openbmb/MiniCPM4-0.5B"
    return c


def _minicpm3() -> dict[str, Any]:
    # llama.cpp hard-codes scale_emb 12, scale_depth 1.4 and dim_model_base 256 for minicpm3: keep them
    factors = longrope_factors(16)
    return {"_name_or_path": "openbmb/MiniCPM3-4B", "architectures": ["MiniCPM3ForCausalLM"],
            "auto_map": {k: v.replace("MiniCPM", "MiniCPM3") for k, v in _AUTO_MAP.items()},
            "bos_token_id": 1, "eos_token_id": [2, SP_VOCAB], "hidden_act": "silu", "initializer_range": 0.1,
            "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 640, "max_position_embeddings": 32768,
            "num_attention_heads": 4, "num_key_value_heads": 4, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
            "q_lora_rank": 256, "kv_lora_rank": 256, "rms_norm_eps": 1e-05,
            "rope_scaling": {"type": "longrope", "long_factor": factors, "short_factor": factors,
                             "original_max_position_embeddings": 32768},
            "torch_dtype": "bfloat16", "transformers_version": "4.41.0", "use_cache": True,
            "vocab_size": SP_VOCAB + len(CHATML), "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4}


def _minicpm5() -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 256,
            "initializer_range": 0.02, "intermediate_size": 768, "max_position_embeddings": 131072,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
            "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
            "rope_theta": 5000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "5.6.0", "use_cache": True, "vocab_size": BPE_VOCAB}


# variant name -> (config factory, tokenizer style)
VARIANTS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "minicpm-2b": (_minicpm_2b, "sp"),
    "minicpm-1b": (_minicpm_1b, "sp"),
    "minicpm-2b-128k": (_minicpm_2b_128k, "sp"),
    "minicpm-s": (_minicpm_s, "sp"),
    "minicpm-moe": (_minicpm_moe, "sp"),
    "minicpm4": (_minicpm4, "sp-chatml"),
    "minicpm4-0.5b": (_minicpm4_05b, "sp-chatml"),
    "bitcpm4": (_minicpm4_05b, "sp-chatml"),
    "minicpm3": (_minicpm3, "sp-chatml"),
    "minicpm5": (_minicpm5, "bpe"),
}


def build_checkpoint(out_dir: str | Path, variant: str, *, layout: Layout | str = Layout.SAFETENSORS,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, ternary: Ternary | str | None = None,
                     config_overrides: dict[str, Any] | None = None) -> Path:
    """Write a tiny checkpoint of ``variant`` into ``out_dir`` (created) and return the folder.
    ``bitcpm4`` is ternary per output row unless ``ternary`` says otherwise."""
    make_config, tokenizer_style = VARIANTS[variant]
    config = {**make_config(), **(config_overrides or {})}
    if ternary is None and variant == "bitcpm4":
        ternary = Ternary.ROW
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    spec = read_spec(config)
    tensors = random_weights(spec, dtype=dtype, seed=seed, ternary=Ternary(ternary) if ternary else None)
    _write_weights(out, tensors, Layout(layout))
    _write_tokenizer(out, tokenizer_style, spec)
    return out


def random_weights(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                   ternary: Ternary | None = None) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of ``spec``: norms near 1, matrices with std 0.05 (so logits are
    not flat), and, for ``ternary``, every linear stored as scale x {-1, 0, +1}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.tensor_shapes().items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            w = 0.05 * torch.randn(shape, generator=gen)
            if ternary is not None and _is_linear(name):
                w = _ternarize(w, ternary, gen)
        out[name] = w.to(dtype)
    return out


def _is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("proj.weight") or ".experts." in name


def _ternarize(w: torch.Tensor, granularity: Ternary, gen: torch.Generator) -> torch.Tensor:
    rows, cols = w.shape
    trits = torch.randint(-1, 2, (rows, cols), generator=gen).float()
    if granularity is Ternary.TENSOR:
        scale = torch.full((1, 1), 0.05)
    elif granularity is Ternary.ROW:
        scale = 0.02 + 0.06 * torch.rand(rows, 1, generator=gen)
    else:
        group = int(granularity.value.removeprefix("group"))
        scale = (0.02 + 0.06 * torch.rand(rows, cols // group, 1, generator=gen)).expand(-1, -1, group)
        scale = scale.reshape(rows, cols)
    # bf16-representable scales keep scale x trit exact in every storage dtype
    return trits * scale.to(torch.bfloat16).float()


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], layout: Layout) -> None:
    if layout is Layout.BIN:
        torch.save(tensors, out / "pytorch_model.bin")
        return
    if layout is Layout.SAFETENSORS:
        _write_safetensors(out / "model.safetensors", tensors)
        return
    names = list(tensors)
    n_shards = 3
    per = math.ceil(len(names) / n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        _write_safetensors(out / shard, part)
        weight_map.update({n: shard for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with StreamingWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                         metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def _write_tokenizer(out: Path, style: str, spec: ModelSpec) -> None:
    if style == "bpe":
        shutil.copy(DATA / "bpe_tokenizer.json", out / "tokenizer.json")
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast",
                  "chat_template": _CHATML_TEMPLATE}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return
    shutil.copy(DATA / "tokenizer.model", out / "tokenizer.model")
    config: dict[str, Any] = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                              "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
                              "tokenizer_class": "LlamaTokenizer"}
    if style == "sp-chatml":
        decoder = {str(SP_VOCAB + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for i, t in enumerate(CHATML)}
        config.update(added_tokens_decoder=decoder, additional_special_tokens=CHATML, chat_template=_CHATML_TEMPLATE)
        (out / "added_tokens.json").write_text(json.dumps({t: SP_VOCAB + i for i, t in enumerate(CHATML)}))
    else:
        config["chat_template"] = _MINICPM1_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MINICPM1_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'<用户>' + message['content'].strip() + "
    "'<AI>'}}{% else %}{{message['content'].strip()}}{% endif %}{% endfor %}"
)
