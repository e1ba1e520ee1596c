"""GGUF conversion without llama.cpp: metadata key by key as llama.cpp's converter writes it (values read
from conversion/base.py, conversion/minicpm.py, conversion/llama.py and gguf-py at llama.cpp 4df29be4f, and
matched byte for byte against that converter's output for these fixtures while writing this), tensor
names, shapes, types and order, the q/k permutation, merged experts, refusals and atomic output.

Files are read back with gguf-py's ``GGUFReader`` (an independent reader), not with cpmkit's.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf_helpers import LONGROPE_OVERRIDES, checkpoint, converted

from cpmkit.convert.gguf.convert import convert_to_gguf
from cpmkit.convert.gguf.describe import describe_gguf
from cpmkit.convert.gguf.families import permute_rows, unpermute_rows
from cpmkit.errors import CpmkitError
from cpmkit.testing.fixtures import SP_VOCAB


def _f32(x: float) -> float:
    return float(np.float32(x))


def _fields(path) -> list[tuple[str, object]]:
    reader = GGUFReader(path)
    return [(name, f.contents()) for name, f in reader.fields.items() if not name.startswith("GGUF.")]


def _types(path) -> dict[str, tuple[str, list[int]]]:
    """GGUF tensor name -> (type, ggml shape ne0 first), in file order."""
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in GGUFReader(path).tensors}


def _check_keys(path, expected: list[tuple[str, object]]) -> dict[str, object]:
    """The scalar keys appear in exactly this order (arrays are checked by the caller)."""
    fields = _fields(path)
    scalars = [(k, v) for k, v in fields if not isinstance(v, list)]
    assert [k for k, _ in scalars] == [k for k, _ in expected]
    for (key, value), (_, want) in zip(scalars, expected):
        assert value == want, key
    return dict(fields)


def _chat_template(ck) -> str:
    return json.loads(ck.root.joinpath("tokenizer_config.json").read_text())["chat_template"]


def test_minicpm4_untied_longrope_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm4")
    path = converted(root, ck, "BF16")
    fields = _check_keys(path, [
        ("general.architecture", "minicpm"), ("general.type", "model"), ("general.name", "MiniCPM4 8B"),
        ("general.organization", "Openbmb"), ("general.finetune", "8b"), ("general.basename", "MiniCPM4"),
        ("general.size_label", "2.1M"),
        ("minicpm.block_count", 2), ("minicpm.context_length", 32768), ("minicpm.embedding_length", 256),
        ("minicpm.feed_forward_length", 768), ("minicpm.attention.head_count", 4),
        ("minicpm.attention.head_count_kv", 2), ("minicpm.rope.scaling.type", "longrope"),
        ("minicpm.rope.freq_base", 10000.0), ("minicpm.attention.layer_norm_rms_epsilon", _f32(1e-6)),
        ("general.file_type", 32), ("minicpm.embedding_scale", 12.0),
        ("minicpm.residual_scale", _f32(1.4 / math.sqrt(2))), ("minicpm.logit_scale", 4.0),
        ("general.quantization_version", 2),
        ("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "default"),
        # eos_token_id is the list [2, 997]: SpecialVocab accepts ints only, so no eos key
        ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.padding_token_id", 2),
        ("tokenizer.ggml.add_bos_token", True), ("tokenizer.ggml.add_eos_token", False),
        ("tokenizer.chat_template", _chat_template(ck)),
    ])
    tokens, scores, types = (fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                 "tokenizer.ggml.token_type"))
    assert len(tokens) == len(scores) == len(types) == SP_VOCAB + 8
    assert (tokens[0], types[0], tokens[1], types[1], tokens[3], types[3]) == ("<unk>", 2, "<s>", 3, "<0x00>", 6)
    assert (tokens[SP_VOCAB], types[SP_VOCAB], scores[SP_VOCAB]) == ("<|im_end|>", 3, -1000.0)  # added, CONTROL
    assert types[300] == 1 and scores[300] < 0  # a normal piece keeps its SentencePiece score

    tensors = _types(path)
    assert list(tensors)[:4] == ["rope_factors_long.weight", "rope_factors_short.weight", "output.weight",
                                 "token_embd.weight"]  # extra tensors first, then names sorted
    assert tensors["rope_factors_long.weight"] == ("F32", [32])
    assert tensors["output.weight"] == ("BF16", [256, SP_VOCAB + 8])
    assert tensors["blk.0.attn_k.weight"] == ("BF16", [256, 128])
    assert tensors["blk.1.ffn_down.weight"] == ("BF16", [768, 256])
    assert tensors["blk.1.ffn_norm.weight"] == ("F32", [256])
    assert len(tensors) == 2 + 3 + 2 * 9


def test_minicpm_2b_tied_f16_no_theta(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm-2b")
    path = converted(root, ck, "F16")
    fields = _check_keys(path, [
        ("general.architecture", "minicpm"), ("general.type", "model"), ("general.name", "CPM 2B"),
        ("general.organization", "Openbmb"), ("general.finetune", "2b"), ("general.basename", "CPM"),
        ("general.size_label", "1.8M"),
        ("minicpm.block_count", 2), ("minicpm.context_length", 4096), ("minicpm.embedding_length", 256),
        ("minicpm.feed_forward_length", 640), ("minicpm.attention.head_count", 4),
        ("minicpm.attention.head_count_kv", 4),
        # no rope_theta in the config: no freq_base (llama.cpp's default is 10000); rope_scaling null
        ("minicpm.attention.layer_norm_rms_epsilon", _f32(1e-5)), ("general.file_type", 1),
        ("minicpm.embedding_scale", 12.0), ("minicpm.residual_scale", _f32(1.4 / math.sqrt(2))),
        ("minicpm.logit_scale", 4.0), ("general.quantization_version", 2),
        ("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "default"),
        ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.add_bos_token", True), ("tokenizer.ggml.add_eos_token", False),
        ("tokenizer.chat_template", _chat_template(ck)),
    ])
    assert len(fields["tokenizer.ggml.tokens"]) == SP_VOCAB
    tensors = _types(path)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"] == ("F16", [256, SP_VOCAB])
    assert tensors["blk.0.ffn_down.weight"] == ("F16", [640, 256])


def test_minicpm_2b_128k_padding_and_expert_keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm-2b-128k")
    fields = dict(_fields(converted(root, ck, "F16")))
    # num_experts: 0 is written as it stands (the converter writes every key it finds); dynamic rope: nothing
    assert fields["minicpm.expert_count"] == 0 and fields["minicpm.expert_used_count"] == 0
    assert fields["minicpm.rope.freq_base"] == 1e6 and "minicpm.rope.scaling.type" not in fields
    tokens, scores, types = (fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                 "tokenizer.ggml.token_type"))
    # vocab_size = tokenizer + 7: the slots stay "[PAD{id}]" with score -10000, type UNUSED
    assert len(tokens) == SP_VOCAB + 7
    assert (tokens[-1], scores[-1], types[-1]) == (f"[PAD{SP_VOCAB + 6}]", -10000.0, 5)


def test_minicpm3_f32(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm3")
    path = converted(root, ck, "F32")
    _check_keys(path, [
        ("general.architecture", "minicpm3"), ("general.type", "model"), ("general.name", "MiniCPM3 4B"),
        ("general.organization", "Openbmb"), ("general.finetune", "4b"), ("general.basename", "MiniCPM3"),
        ("general.size_label", "2.1M"),
        # MiniCPM3Model.set_gguf_parameters: file type first, no rope/scale keys
        ("general.file_type", 0), ("minicpm3.context_length", 32768), ("minicpm3.embedding_length", 256),
        ("minicpm3.block_count", 2), ("minicpm3.feed_forward_length", 640), ("minicpm3.attention.head_count", 4),
        ("minicpm3.attention.head_count_kv", 4), ("minicpm3.attention.layer_norm_rms_epsilon", _f32(1e-5)),
        ("minicpm3.vocab_size", SP_VOCAB + 8), ("minicpm3.attention.q_lora_rank", 256),
        ("minicpm3.attention.kv_lora_rank", 256), ("minicpm3.attention.key_length", 96),
        ("minicpm3.rope.dimension_count", 32), ("general.quantization_version", 2),
        ("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "default"), ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.add_bos_token", True), ("tokenizer.ggml.add_eos_token", False),
        ("tokenizer.chat_template", _chat_template(ck)),
    ])
    tensors = _types(path)
    assert tensors["rope_factors_short.weight"] == ("F32", [16])
    assert tensors["blk.0.attn_q_a.weight"] == ("F32", [256, 256])
    assert tensors["blk.0.attn_kv_a_mqa.weight"] == ("F32", [256, 256 + 32])
    assert tensors["blk.0.attn_kv_b.weight"] == ("F32", [256, 4 * (64 + 64)])
    assert tensors["blk.0.attn_q_a_norm.weight"] == ("F32", [256])
    # no q/k permutation for MLA (NEOX rope): stored exactly as in the checkpoint
    q_b = GGUFReader(path).get_tensor(list(tensors).index("blk.0.attn_q_b.weight")).data
    assert np.array_equal(q_b, ck.read("model.layers.0.self_attn.q_b_proj.weight").float().numpy())


def test_minicpm5_llama_bpe_f16(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm5")
    path = converted(root, ck, "F16")
    fields = _check_keys(path, [
        ("general.architecture", "llama"), ("general.type", "model"), ("general.name", "Minicpm5"),  # folder
        ("general.size_label", "2.5M"),
        ("llama.block_count", 2), ("llama.context_length", 131072), ("llama.embedding_length", 256),
        ("llama.feed_forward_length", 768), ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2),
        ("llama.rope.freq_base", 5e6), ("llama.attention.layer_norm_rms_epsilon", _f32(1e-6)),
        ("llama.attention.key_length", 128), ("llama.attention.value_length", 128), ("general.file_type", 1),
        ("llama.vocab_size", 1000), ("llama.rope.dimension_count", 128), ("general.quantization_version", 2),
        ("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "minicpm5"),
        ("tokenizer.ggml.bos_token_id", 0), ("tokenizer.ggml.eos_token_id", 1), ("tokenizer.ggml.unknown_token_id", 2),
        ("tokenizer.ggml.padding_token_id", 1), ("tokenizer.ggml.add_bos_token", True),
        ("tokenizer.ggml.add_eos_token", False), ("tokenizer.chat_template", _chat_template(ck)),
    ])
    tokens, types, merges = (fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                 "tokenizer.ggml.merges"))
    assert "tokenizer.ggml.scores" not in fields
    assert tokens[:4] == ["<s>", "</s>", "<unk>", "<|im_end|>"] and types[:7] == [3] * 7 and types[7] == 1
    assert len(tokens) == 1000 and len(merges) == 737 and merges[0] == "Ġ t"
    tensors = _types(path)
    assert tensors["blk.0.attn_q.weight"] == ("F16", [256, 4 * 128])  # head_dim 128 != 256 / 4
    assert tensors["blk.0.attn_output.weight"] == ("F16", [4 * 128, 256])


def test_qk_permutation(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm5")
    reader = GGUFReader(converted(root, ck, "F32"))  # bf16 weights are exact in F32
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    for hf, gguf, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        w = ck.read(f"model.layers.1.self_attn.{hf}.weight").float()
        expected = permute_rows(w, heads)
        assert np.array_equal(stored[f"blk.1.{gguf}.weight"], expected.numpy())
        assert torch.equal(unpermute_rows(expected, heads), w)
        # llama.cpp's layout: new row h*d + 2i + j holds HF row h*d + j*d/2 + i
        d = w.shape[0] // heads
        h, i, j = heads - 1, 5, 1
        assert torch.equal(expected[h * d + 2 * i + j], w[h * d + j * d // 2 + i])
    assert np.array_equal(stored["blk.1.attn_v.weight"],
                          ck.read("model.layers.1.self_attn.v_proj.weight").float().numpy())


def test_moe_experts_merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm-moe")
    path = converted(root, ck, "F32")  # bf16 weights are exact in F32
    fields = dict(_fields(path))
    assert fields["minicpm.expert_count"] == 8 and fields["minicpm.expert_used_count"] == 2
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for hf, gguf, ne in (("w1", "ffn_gate_exps", [256, 256, 8]), ("w3", "ffn_up_exps", [256, 256, 8]),
                         ("w2", "ffn_down_exps", [256, 256, 8])):
        t = tensors[f"blk.1.{gguf}.weight"]
        assert [int(n) for n in t.shape] == ne and t.tensor_type.name == "F32"
        for e in (0, 5):
            expert = ck.read(f"model.layers.1.mlp.experts.{e}.{hf}.weight").float().numpy()
            assert np.array_equal(np.array(t.data)[e], expert)
    router = tensors["blk.0.ffn_gate_inp.weight"]
    assert router.tensor_type.name == "F32" and [int(n) for n in router.shape] == [256, 8]
    assert not any(".experts." in name or "ffn_gate.weight" in name for name in tensors)


def test_longrope_context_keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm4", config_overrides=LONGROPE_OVERRIDES)
    fields = dict(_fields(converted(root, ck, "BF16")))
    keys = list(fields)
    # beyond llama.cpp's converter, after the scales: the original context and sqrt(1 + ln(128/32) / ln 32)
    assert keys[keys.index("minicpm.logit_scale") + 1:][:2] == ["minicpm.rope.scaling.original_context_length",
                                                                 "minicpm.rope.scaling.attn_factor"]
    assert fields["minicpm.rope.scaling.original_context_length"] == 32
    assert fields["minicpm.rope.scaling.attn_factor"] == _f32(math.sqrt(1 + math.log(4) / math.log(32)))
    assert fields["minicpm.context_length"] == 128


def test_quantized_order_and_keys(tmp_path_factory):
    """llama-quantize's layout: loader order, general.quantization_version then general.file_type last."""
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm5")
    path = converted(root, ck, "Q8_0")
    keys = [k for k, _ in _fields(path)]
    assert keys[-2:] == ["general.quantization_version", "general.file_type"]
    assert dict(_fields(path))["general.file_type"] == 7
    tensors = _types(path)
    assert list(tensors)[:4] == ["output.weight", "output_norm.weight", "token_embd.weight", "blk.0.attn_k.weight"]
    assert tensors["output.weight"][0] == "Q8_0" and tensors["blk.1.ffn_norm.weight"][0] == "F32"


def test_describe_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path = converted(root, checkpoint(root, "minicpm5"), "Q8_0")
    info = describe_gguf(path)
    assert info["architecture"] == "llama" and info["file_type"] == "Q8_0"
    assert info["metadata"]["tokenizer.ggml.tokens"]["count"] == 1000
    assert {"name": "blk.0.attn_q.weight", "type": "Q8_0", "shape": [512, 256]} in info["tensors"]
    assert info["file_size"] == path.stat().st_size
    assert 8.4 < info["bits_per_weight"] < 8.6  # Q8_0 is 8.5 bits; norms in F32 add a little


def test_existing_output_refused(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm5")
    out = root / "exists.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(CpmkitError, match="already exists"):
        convert_to_gguf(ck, out, file_type="F16")
    assert out.read_bytes() == b"keep me"


def test_fatrelu_refused_nothing_written(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm-s")
    with pytest.raises(CpmkitError, match="fatrelu") as err:
        convert_to_gguf(ck, root / "s.gguf", file_type="F16")
    assert "\n" not in str(err.value)
    assert list(root.glob("s.gguf*")) == [] and list(root.glob(".s.gguf*")) == []


def test_minicpm3_scale_mismatch(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm3", config_overrides={"dim_model_base": 64})
    with pytest.raises(CpmkitError, match="allow-scale-mismatch"):
        convert_to_gguf(ck, root / "m3.gguf", file_type="F16")
    assert not (root / "m3.gguf").exists()
    with pytest.warns(UserWarning, match="12/1.4/256"):
        convert_to_gguf(ck, root / "m3.gguf", file_type="F16", allow_scale_mismatch=True)
    assert (root / "m3.gguf").is_file()


def test_ternary_types_refuse_non_ternary(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "bitcpm4", ternary="group64")  # a scale every 64 weights: TQ2_0 would lose it
    with pytest.raises(CpmkitError, match="per 256"):
        convert_to_gguf(ck, root / "t.gguf", file_type="TQ2_0")
    assert list(root.glob("*t.gguf*")) == []


def test_float_types_reject_imatrix_and_overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ck = checkpoint(root, "minicpm5")
    with pytest.raises(CpmkitError, match="quantized file types"):
        convert_to_gguf(ck, root / "x.gguf", file_type="BF16", tensor_types=["attn_v=q8_0"])
    with pytest.raises(CpmkitError, match="Q9_9.*Q4_K_M"):
        convert_to_gguf(ck, root / "x.gguf", file_type="Q9_9")
