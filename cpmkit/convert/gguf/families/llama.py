"""LlamaForCausalLM (MiniCPM5) -> GGUF arch ``llama`` (llama.cpp conversion/llama.py ``LlamaModel``).

Plain Llama: the base keys plus ``vocab_size`` and ``rope.dimension_count`` (MiniCPM5's explicit head_dim,
also written as key/value length by the base), q/k rows permuted, and the vocabulary of
``LlamaModel.set_vocab`` (MiniCPM5: byte-level BPE with llama.cpp's ``minicpm5`` pre-tokenizer).
"""

from __future__ import annotations

from typing import Any

from gguf import Keys

from cpmkit.convert.gguf.families import (
    DENSE_TENSOR_NAMES,
    PERMUTED_QK,
    GGUFFamily,
    config_from_gguf,
    register,
    text_model_parameters,
)
from cpmkit.formats.gguf.file import GGUFContents
from cpmkit.formats.gguf.vocab import add_llama_vocab
from cpmkit.spec import Family, ModelSpec


def parameters(spec: ModelSpec, config: dict[str, Any], file_type: int) -> list[tuple[str, Any]]:
    return [*text_model_parameters(spec, config, file_type),
            (Keys.LLM.VOCAB_SIZE, config["vocab_size"]),
            (Keys.Rope.DIMENSION_COUNT, spec.head_dim)]


def read_config(contents: GGUFContents) -> dict[str, Any]:
    config = config_from_gguf(contents, "LlamaForCausalLM")
    config["head_dim"] = contents.arch_value(Keys.Attention.KEY_LENGTH,
                                             config["hidden_size"] // config["num_attention_heads"])
    return config


LLAMA = register(Family.LLAMA, GGUFFamily(arch="llama", tensor_names=dict(DENSE_TENSOR_NAMES), permuted=PERMUTED_QK,
                                          parameters=parameters, add_vocab=add_llama_vocab, read_config=read_config))
