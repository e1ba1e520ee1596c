"""llama-quantize's per-tensor type mixtures (cpmkit.convert.gguf.mix): rule-level unit tests, and an
end-to-end check against the real llama_model_quantize on a tiny MiniCPM GGUF (types and bytes)."""

import ctypes

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.convert.gguf.mix import (
    GGUFFileType,
    TensorSpec,
    TypeOverride,
    choose_tensor_types,
    loader_order,
    tensor_type_fallback,
    use_more_bits,
)
from cpmkit.convert.gguf.quantize import quantize_tensor
from cpmkit.errors import CpmkitError


def minicpm_specs(n_layer: int, n_embd: int, n_ff: int, n_kv_dim: int, vocab: int, tied: bool):
    specs = [TensorSpec("token_embd.weight", (vocab, n_embd)), TensorSpec("output_norm.weight", (n_embd,))]
    if not tied:
        specs.append(TensorSpec("output.weight", (vocab, n_embd)))
    for i in range(n_layer):
        p = f"blk.{i}."
        specs += [TensorSpec(p + "attn_norm.weight", (n_embd,)), TensorSpec(p + "ffn_norm.weight", (n_embd,)),
                  TensorSpec(p + "attn_q.weight", (n_embd, n_embd)),
                  TensorSpec(p + "attn_k.weight", (n_kv_dim, n_embd)),
                  TensorSpec(p + "attn_v.weight", (n_kv_dim, n_embd)),
                  TensorSpec(p + "attn_output.weight", (n_embd, n_embd)),
                  TensorSpec(p + "ffn_gate.weight", (n_ff, n_embd)), TensorSpec(p + "ffn_up.weight", (n_ff, n_embd)),
                  TensorSpec(p + "ffn_down.weight", (n_embd, n_ff))]
    return specs


def layers_with(types: dict, suffix: str, qtype: QType) -> list[int]:
    return sorted(int(n.split(".")[1]) for n, t in types.items() if n.endswith(suffix) and t == qtype)


# ---- rules ---------------------------------------------------------------------------------------

USE_MORE_BITS = {  # layers that get the larger type, as listed in shared/formats/GGUF.md §4
    16: [0, 1, 4, 7, 10, 13, 14, 15],
    32: [0, 1, 2, 3, *range(6, 28, 3), 28, 29, 30, 31],
    40: [0, 1, 2, 3, 4, *range(7, 35, 3), *range(35, 40)],
    52: [*range(0, 6), *range(8, 45, 3), *range(45, 52)],
    62: [*range(0, 7), *range(9, 52, 3), *range(54, 62)],
}


@pytest.mark.parametrize("n_layer", sorted(USE_MORE_BITS))
def test_use_more_bits_layer_sets(n_layer):
    assert [i for i in range(n_layer) if use_more_bits(i, n_layer)] == USE_MORE_BITS[n_layer]


def test_fallbacks_for_rows_not_multiple_of_256():
    expected = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0, QType.Q2_K: QType.Q4_0,
                QType.Q3_K: QType.Q4_0, QType.TQ1_0: QType.Q4_0, QType.TQ2_0: QType.Q4_0}
    for qtype, fallback in expected.items():
        assert tensor_type_fallback(qtype, 640) == fallback
        assert tensor_type_fallback(qtype, 768) == qtype
        assert tensor_type_fallback(qtype, 100) == QType.F16  # not even a multiple of 32
    assert tensor_type_fallback(QType.Q8_0, 48) == QType.F16


def test_q4_k_m_on_minicpm_2b_shapes():
    """40 layers, 2304 hidden, 5760 intermediate: ffn_down rows of 5760 fall back to 32-blocks."""
    specs = minicpm_specs(40, 2304, 5760, 2304, 1000, tied=True)
    types = choose_tensor_types(specs, GGUFFileType.Q4_K_M, n_layer=40)
    assert "output.weight" not in types and types["token_embd.weight"] == QType.Q6_K  # tied
    assert layers_with(types, "attn_v.weight", QType.Q6_K) == USE_MORE_BITS[40]
    assert layers_with(types, "ffn_down.weight", QType.Q8_0) == USE_MORE_BITS[40]  # Q6_K -> Q8_0
    assert len(layers_with(types, "ffn_down.weight", QType.Q5_0)) == 20  # Q4_K -> Q5_0
    assert {types[f"blk.3.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_up")} == {QType.Q4_K}
    assert types["blk.0.attn_norm.weight"] == QType.F32


@pytest.mark.parametrize("file_type, embd, out, v_layers, down", [
    (GGUFFileType.Q4_K_S, QType.Q4_K, QType.Q6_K, {QType.Q5_K: [0, 1, 2, 3]}, {QType.Q5_K: [0, 1]}),
    (GGUFFileType.Q5_K_M, QType.Q5_K, QType.Q6_K, {QType.Q6_K: USE_MORE_BITS[16]}, {QType.Q6_K: USE_MORE_BITS[16]}),
    (GGUFFileType.Q3_K_M, QType.Q3_K, QType.Q6_K, {QType.Q5_K: [0, 1]},
     {QType.Q5_K: [0], QType.Q4_K: list(range(1, 16))}),
    (GGUFFileType.Q2_K, QType.Q2_K, QType.Q6_K, {QType.Q3_K: list(range(16))}, {QType.Q3_K: list(range(16))}),
    (GGUFFileType.Q8_0, QType.Q8_0, QType.Q8_0, {QType.Q8_0: list(range(16))}, {QType.Q8_0: list(range(16))}),
    (GGUFFileType.TQ2_0, QType.Q4_K, QType.Q6_K, {QType.TQ2_0: list(range(16))}, {QType.TQ2_0: list(range(16))}),
])
def test_file_type_rules(file_type, embd, out, v_layers, down):
    types = choose_tensor_types(minicpm_specs(16, 256, 512, 128, 300, tied=False), file_type, n_layer=16, n_gqa=2)
    assert types["token_embd.weight"] == embd and types["output.weight"] == out
    for qtype, layers in v_layers.items():
        assert layers_with(types, "attn_v.weight", qtype) == layers
    for qtype, layers in down.items():
        assert layers_with(types, "ffn_down.weight", qtype) == layers


def test_q2_k_attention_depends_on_gqa_and_q3_k_m_output():
    specs = minicpm_specs(4, 256, 512, 128, 300, tied=False)
    assert choose_tensor_types(specs, GGUFFileType.Q2_K, n_layer=4, n_gqa=4)["blk.1.attn_v.weight"] == QType.Q4_K
    assert choose_tensor_types(specs, GGUFFileType.Q2_K, n_layer=4, n_gqa=2)["blk.1.attn_output.weight"] == QType.Q3_K
    assert choose_tensor_types(specs, GGUFFileType.Q3_K_M, n_layer=4)["blk.1.attn_output.weight"] == QType.Q4_K


def test_imatrix_turns_early_q4_0_ffn_down_into_q4_1():
    specs = minicpm_specs(16, 256, 512, 128, 300, tied=False)
    with_im = choose_tensor_types(specs, GGUFFileType.Q4_0, n_layer=16, has_imatrix=True)
    assert layers_with(with_im, "ffn_down.weight", QType.Q4_1) == [0, 1]
    assert layers_with(choose_tensor_types(specs, GGUFFileType.Q4_0, n_layer=16), "ffn_down.weight", QType.Q4_1) == []
    assert with_im["output.weight"] == QType.Q6_K


def test_eight_experts_bumps_and_moe_layers_from_names():
    specs = minicpm_specs(8, 256, 512, 128, 300, tied=False)
    specs = [s for s in specs if "ffn_down" not in s.name]
    specs += [TensorSpec(f"blk.{i}.ffn_down_exps.weight", (8, 256, 512)) for i in range(8)]
    specs += [TensorSpec(f"blk.{i}.ffn_down_shexp.weight", (256, 512)) for i in range(8)]
    specs += [TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (8, 256)) for i in range(8)]
    types = choose_tensor_types(specs, GGUFFileType.Q4_K_M, n_layer=8, n_expert=8)
    assert types["blk.5.attn_v.weight"] == types["blk.5.attn_k.weight"] == QType.Q8_0
    assert types["blk.5.attn_output.weight"] == QType.Q5_K
    assert types["blk.0.ffn_gate_inp.weight"] == QType.F32  # routers are never quantized
    # two ffn_down tensors per layer: the layer comes from the name, not from a counter
    for suffix in ("ffn_down_exps.weight", "ffn_down_shexp.weight"):
        assert layers_with(types, suffix, QType.Q6_K) == [0, 3, 6, 7]  # use_more_bits(i, 8)


def test_float_file_types_convert_only_quantizable_tensors():
    specs = minicpm_specs(2, 256, 512, 128, 300, tied=True) + [TensorSpec("rope_factors_long.weight", (32,))]
    types = choose_tensor_types(specs, GGUFFileType.BF16, n_layer=2, overrides=[TypeOverride.parse("attn_v=q8_0")])
    assert types["blk.1.attn_v.weight"] == QType.BF16  # overrides apply to quantized file types only
    assert types["rope_factors_long.weight"] == types["output_norm.weight"] == QType.F32


def test_overrides_win_skip_the_rules_and_keep_counters_unmoved():
    specs = minicpm_specs(16, 256, 640, 128, 300, tied=False)
    overrides = [TypeOverride.parse(r"blk\.3\.attn_v=q8_0"), TypeOverride.parse("ffn_down=Q4_K"),
                 TypeOverride.parse("FFN_DOWN=q8_0")]
    types = choose_tensor_types(specs, GGUFFileType.Q4_K_M, n_layer=16, overrides=overrides)
    assert types["blk.3.attn_v.weight"] == QType.Q8_0
    # blk.3 did not advance i_attention_wv, so blk.4 is counted as index 3 (no more bits) ...
    assert types["blk.4.attn_v.weight"] == QType.Q4_K and types["blk.5.attn_v.weight"] == QType.Q6_K
    # ... and the first matching pattern wins, then the 640-column fallback applies
    assert set(layers_with(types, "ffn_down.weight", QType.Q5_0)) == set(range(16))


def test_override_parsing_errors():
    assert TypeOverride.parse("Attn_V=Q6_k") == TypeOverride("attn_v", QType.Q6_K)
    for bad in ("attn_v", "=q8_0", "attn_v=", "attn_v=iq2_xxs", "attn_v=nope", "(=q8_0"):
        with pytest.raises(CpmkitError):
            TypeOverride.parse(bad)


def test_loader_order_and_file_type_ids():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_k.weight", "token_embd.weight"]
    assert loader_order(names) == ["output.weight", "token_embd.weight", "blk.2.attn_k.weight",
                                   "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]
    assert GGUFFileType("Q4_K_M").llama_file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M == 15
    assert GGUFFileType.TQ2_0.llama_file_type == 37 and GGUFFileType.BF16.default_type == QType.BF16


# ---- end to end against llama_model_quantize -------------------------------------------------------

N_LAYER, N_EMBD, N_FF, N_HEAD, N_KV, VOCAB = 16, 256, 288, 4, 1, 300  # N_FF: not a multiple of 256


def tiny_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    specs = minicpm_specs(N_LAYER, N_EMBD, N_FF, N_EMBD // N_HEAD * N_KV, VOCAB, tied=False)
    return {s.name: (rng.standard_normal(s.shape) * 0.02).astype(np.float32) for s in specs}


def write_tiny_minicpm(path, weights: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    """A 16-layer F32 MiniCPM GGUF with a minimal SentencePiece-style ("llama") vocabulary; the tied
    variant leaves out output.weight. Returns the tensors written."""
    w = gguf.GGUFWriter(str(path), "minicpm")
    w.add_block_count(N_LAYER)
    w.add_context_length(512)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_embedding_scale(12.0)
    w.add_residual_scale(1.4 / N_LAYER ** 0.5)
    w.add_logit_scale(N_EMBD / 256)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [f"t{i}" for i in range(VOCAB - 259)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    written = {n: a for n, a in weights.items() if not (tied and n == "output.weight")}
    for name, array in written.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def llama():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, llama):
    """Both variants share the same arrays, so quantized results can be shared too."""
    root = tmp_path_factory.mktemp("minicpm")
    weights = tiny_weights()
    return {tied: (root / f"tied{tied}.gguf", write_tiny_minicpm(root / f"tied{tied}.gguf", weights, tied))
            for tied in (False, True)}


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_models):
    """A random importance vector for every block weight."""
    g = torch.Generator().manual_seed(5)
    return {n: torch.rand(a.shape[-1], generator=g) + 0.05 for n, a in tiny_models[False][1].items()
            if n.startswith("blk.") and a.ndim == 2}


@pytest.fixture(scope="module")
def our_bytes():
    """quantize_tensor results shared by the file types (most tensors get the same type in several)."""
    cache = {}

    def get(name, data, qtype, qw):
        key = (id(data), qtype, id(qw))  # the arrays live in module fixtures, so ids are stable
        if key not in cache:
            cache[key] = quantize_tensor(torch.from_numpy(data), qtype, qw, name=name).numpy()
        return cache[key]
    return get


def run_llama_quantize(llama, src, dst, file_type, imatrix=None, overrides=()):
    params = llama.llama_model_quantize_default_params()
    params.ftype = file_type.llama_file_type
    params.nthread = 2
    keep = []
    if imatrix:
        entries = (llama.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(values.numpy(), dtype=np.float32)
            keep.append(arr)
            entry.name = name.encode()
            entry.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = arr.size
        params.imatrix = entries
        keep.append(entries)
    if overrides:
        table = (llama.llama_model_tensor_override * (len(overrides) + 1))()
        for entry, o in zip(table, overrides):
            entry.pattern = o.pattern.encode()
            entry.type = int(o.qtype)
        table[len(overrides)].type = len(QType)  # terminator: pattern NULL
        params.tt_overrides = table
        keep.append(table)
    assert llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


CASES = [  # (file type, tied, with imatrix, overrides)
    (GGUFFileType.Q4_K_M, False, False, ()), (GGUFFileType.Q4_K_S, False, False, ()),
    (GGUFFileType.Q3_K_M, False, False, ()), (GGUFFileType.Q2_K, False, False, ()),
    (GGUFFileType.Q6_K, False, False, ()), (GGUFFileType.Q8_0, False, False, ()),
    (GGUFFileType.TQ2_0, False, False, ()), (GGUFFileType.Q4_K_M, True, False, ()),
    (GGUFFileType.TQ1_0, True, False, ()), (GGUFFileType.Q5_K_M, False, True, ()),
    (GGUFFileType.Q4_0, False, True, ()),
    (GGUFFileType.Q4_K_M, False, False, (r"blk\.3\.attn_v=q8_0", "ffn_up=q5_k")),
]


@pytest.mark.parametrize("file_type, tied, with_imatrix, overrides", CASES,
                         ids=[f"{c[0].value}-{'tied' if c[1] else 'untied'}{'-imatrix' if c[2] else ''}"
                              f"{'-overrides' if c[3] else ''}" for c in CASES])
def test_llama_quantize_types_and_bytes(llama, tiny_models, tiny_imatrix, our_bytes, tmp_path, file_type, tied,
                                        with_imatrix, overrides):
    src, data = tiny_models[tied]
    imatrix = tiny_imatrix if with_imatrix else None
    parsed = [TypeOverride.parse(o) for o in overrides]
    dst = tmp_path / "out.gguf"
    run_llama_quantize(llama, src, dst, file_type, imatrix, parsed)

    specs = [TensorSpec(n, a.shape) for n, a in data.items()]
    expected = choose_tensor_types(specs, file_type, n_layer=N_LAYER, n_gqa=N_HEAD // N_KV,
                                   has_imatrix=imatrix is not None, overrides=parsed)
    reader = gguf.GGUFReader(dst)
    assert [t.name for t in reader.tensors] == list(expected)  # llama.cpp's loader order
    assert reader.get_field("general.file_type").contents() == file_type.llama_file_type
    for t in reader.tensors:
        assert QType(t.tensor_type) == expected[t.name], t.name
        if expected[t.name] == QType.F32:
            assert np.array_equal(np.asarray(t.data).reshape(-1), data[t.name].reshape(-1)), t.name
            continue
        qw = imatrix.get(t.name) if imatrix else None
        ours = our_bytes(t.name, data[t.name], expected[t.name], qw)
        assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours), t.name
