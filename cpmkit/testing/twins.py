"""A MiniCPM config restated for an independent implementation that has no MiniCPM of its own: transformers'
Granite carries MiniCPM's muP as four multipliers. Tests compare logits against it; benchmarks hand a twin
folder to tools that only load Hub architectures (llm-compressor, GPTQModel)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cpmkit.formats import hf_folder as hf


def hf_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` from a config's ``rope_scaling`` and ``rope_theta``."""
    scaling = dict(config.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_type": kind, "rope_theta": config.get("rope_theta", 10000.0), **scaling}


def granite_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """MiniCPM's muP expressed in Granite's multipliers, read from the raw config."""
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    return dict(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=config["num_key_value_heads"],
        max_position_embeddings=config["max_position_embeddings"], rms_norm_eps=config["rms_norm_eps"],
        tie_word_embeddings=config.get("tie_word_embeddings", True), rope_parameters=hf_rope_parameters(config),
        embedding_multiplier=config["scale_emb"], residual_multiplier=config["scale_depth"] / math.sqrt(layers),
        logits_scaling=hidden / config["dim_model_base"], attention_multiplier=(hidden // heads) ** -0.5,
    )


def write_granite_twin(checkpoint: Path, out: Path) -> Path:
    """``out``: a GraniteForCausalLM folder with ``checkpoint``'s weights (linked, not copied; the tensor names
    are the same), tokenizer and the config restated by ``granite_kwargs``. Dense MiniCPM only (silu)."""
    config = json.loads((checkpoint / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    twin = {"architectures": ["GraniteForCausalLM"], "model_type": "granite", **granite_kwargs(config),
            **{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config},
            "torch_dtype": config.get("torch_dtype", "bfloat16")}
    (out / "config.json").write_text(json.dumps(twin, indent=2) + "\n")
    for path in checkpoint.iterdir():
        if path.name.endswith((".safetensors", ".safetensors.index.json")) or path.name in hf.COPIED_FILES:
            link = out / path.name
            if not link.exists():
                os.symlink(path.resolve(), link)
    return out
