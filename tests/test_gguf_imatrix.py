"""Importance matrices: cpmkit's collector against a direct recomputation of llama-imatrix's statistics
(squared inputs summed per column, tokens counted, per expert over routed tokens only), llama.cpp's imatrix
GGUF layout read back with gguf-py, the legacy .dat format, and a Q4_K_M conversion that uses the imatrix
exactly as llama-quantize does (per-column weights sums / count)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader
from gguf_helpers import SAMPLE_TEXT, checkpoint, small_imatrix_q4_k_m

from cpmkit.convert.gguf.families import permute_rows
from cpmkit.convert.gguf.imatrix import (
    compute_gguf_imatrix,
    importance,
    save_gguf_imatrix,
)
from cpmkit.convert.gguf.quantize import quantize_tensor
from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.imatrix import ImatrixData, ImatrixEntry, read_imatrix
from cpmkit.models.layers import activation_fn, rope_cos_sin
from cpmkit.models.reference import load_reference
from cpmkit.models.windows import make_windows
from cpmkit.tokenizer import Tokenizer

CTX = 32
TEXT = SAMPLE_TEXT * 2


def _sq(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return (x * x).sum(0)


@pytest.fixture(scope="module")
def moe_imatrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrix")
    ck = checkpoint(root, "minicpm-moe")
    return ck, compute_gguf_imatrix(ck, TEXT, ctx=CTX, dataset="sample.txt")


def test_statistics_equal_direct_recomputation(moe_imatrix):
    """Layer 0 recomputed by hand from the reference model's weights: attention inputs, the router input,
    and each expert's inputs over exactly the tokens routed to it."""
    ck, imatrix = moe_imatrix
    tok = Tokenizer(ck.root, ck.config)
    windows = make_windows(tok.encode(TEXT), CTX, tok.special.bos_id, None).tokens  # [n, CTX]
    model = load_reference(ck)
    layer = model.model.layers[0]
    spec = ck.spec
    with torch.no_grad():
        h = model.model.embed_tokens(windows) * spec.mup.scale_emb  # [n, CTX, H]
        x = layer.input_layernorm(h)
        cos, sin = rope_cos_sin(spec.rope, torch.arange(CTX))
        h = h + layer.self_attn(x, cos, sin, None) * spec.mup.residual_scale(spec.num_layers)
        y = layer.post_attention_layernorm(h).reshape(-1, spec.hidden_size)  # [tokens, H]
        probs = torch.softmax(layer.mlp.gate(y).float(), dim=-1)
        chosen = probs.topk(spec.moe.top_k, dim=-1).indices  # [tokens, k]
        n_tokens = windows.numel()
        expected = {"blk.0.attn_q.weight": (_sq(x), [n_tokens]), "blk.0.attn_v.weight": (_sq(x), [n_tokens]),
                    "blk.0.ffn_gate_inp.weight": (_sq(y), [n_tokens])}
        gate_sums, down_sums, counts = [], [], []
        for e, expert in enumerate(layer.mlp.experts):
            rows = y[(chosen == e).any(dim=-1)]
            gate_sums.append(_sq(rows))
            down_sums.append(_sq(activation_fn(spec.activation, 0.0)(expert.w1(rows)) * expert.w3(rows)))
            counts.append(rows.shape[0])
        expected["blk.0.ffn_gate_exps.weight"] = (torch.stack(gate_sums), counts)
        expected["blk.0.ffn_up_exps.weight"] = (torch.stack(gate_sums), counts)
        expected["blk.0.ffn_down_exps.weight"] = (torch.stack(down_sums), counts)
    assert sum(counts) == spec.moe.top_k * n_tokens and 0 not in counts
    for name, (sums, count) in expected.items():
        entry = imatrix.entries[name]
        assert entry.counts.tolist() == count, name
        torch.testing.assert_close(entry.sums.double(), sums.reshape(entry.sums.shape), rtol=1e-5, atol=0)
    assert imatrix.chunk_count == windows.shape[0] and imatrix.chunk_size == CTX
    # only block linears (no lm_head: llama-imatrix without --process-output), 4 attention + router + 3 experts
    assert len(imatrix.entries) == spec.num_layers * 8 and all(n.startswith("blk.") for n in imatrix.entries)


def test_gguf_round_trip_and_layout(moe_imatrix, tmp_path):
    _, imatrix = moe_imatrix
    path = tmp_path / "imatrix.gguf"
    assert save_gguf_imatrix(imatrix, path).path == str(path)
    with pytest.raises(CpmkitError, match="already exists"):
        save_gguf_imatrix(imatrix, path)
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (("sample.txt",), imatrix.chunk_count,
                                                                              CTX, False)
    assert back.entries.keys() == imatrix.entries.keys()
    for name, entry in imatrix.entries.items():
        assert torch.equal(back.entries[name].sums, entry.sums) and torch.equal(back.entries[name].counts, entry.counts)

    # the layout llama.cpp's common_imatrix_load reads, seen through gguf-py
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["sample.txt"],
                      "imatrix.chunk_count": imatrix.chunk_count, "imatrix.chunk_size": CTX}
    assert reader.fields["imatrix.chunk_count"].types[0].name == "UINT32"
    names = [t.name for t in reader.tensors]
    assert names[:4] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts",
                         "blk.0.attn_output.weight.in_sum2", "blk.0.attn_output.weight.counts"]
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = tensors["blk.1.ffn_down_exps.weight.in_sum2"], tensors["blk.1.ffn_down_exps.weight.counts"]
    assert (sums.tensor_type.name, [int(n) for n in sums.shape]) == ("F32", [256, 8])  # ggml [ne0, n_mat]
    assert (counts.tensor_type.name, [int(n) for n in counts.shape]) == ("F32", [1, 8])
    assert np.array_equal(np.array(counts.data).reshape(-1), imatrix.entries["blk.1.ffn_down_exps.weight"].counts)


def test_legacy_dat(tmp_path):
    """save_imatrix_legacy's layout, written by hand: values are (sum / count) * ncall."""
    values = np.array([0.5, 1.5, 3.0, 6.0], dtype="<f4")
    blob = struct.pack("<i", 1) + struct.pack("<i", 19) + b"blk.0.attn_q.weight" + struct.pack("<ii", 3, 4)
    blob += values.tobytes() + struct.pack("<i", 7) + struct.pack("<i", 8) + b"data.txt"
    path = tmp_path / "imatrix.dat"
    path.write_bytes(blob)
    imatrix = read_imatrix(path)
    assert imatrix.legacy and imatrix.chunk_count == 7 and imatrix.datasets == ("data.txt",)
    weights = importance(imatrix, "blk.0.attn_q.weight", (16, 4))
    assert torch.equal(weights, torch.from_numpy(values) / 3.0)  # quantize.cpp: sums / ncall
    with pytest.raises(CpmkitError, match="imatrix holds 4 values"):
        importance(imatrix, "blk.0.attn_q.weight", (16, 8))


def test_gguf_importance_divides_by_count_and_fills_unused_experts():
    entry = ImatrixEntry(torch.tensor([[2.0, 4.0], [9.0, 9.0]]), torch.tensor([4, 0]))
    imatrix = ImatrixData({"blk.0.ffn_up_exps.weight": entry}, ("x",), 1, 4)
    weights = importance(imatrix, "blk.0.ffn_up_exps.weight", (2, 3, 2))
    assert weights.tolist() == [0.5, 1.0, 1.0, 1.0]  # an expert that saw no token gets weight 1
    assert importance(imatrix, "blk.0.attn_q.weight", (3, 2)) is None


def test_bad_imatrix_file(tmp_path):
    path = tmp_path / "junk.dat"
    path.write_bytes(b"\x00\x00\x00\x00junk")
    with pytest.raises(CpmkitError, match="junk.dat"):
        read_imatrix(path)


def test_conversion_uses_imatrix_like_llama_quantize(tmp_path_factory):
    """blk.0.attn_q of the Q4_K_M file is quantize_tensor of the permuted weight with sums / count as its
    per-column weights (and differs from the plain quantization); the file records the imatrix as
    llama-quantize does."""
    root = tmp_path_factory.mktemp("imatrix")
    ck, imatrix, path = small_imatrix_q4_k_m(root)
    entry = imatrix.entries["blk.0.attn_q.weight"]
    weights = entry.sums[0] / entry.counts[0].to(torch.float32)
    w = permute_rows(ck.read("model.layers.0.self_attn.q_proj.weight").float(), ck.spec.num_heads)
    reader = GGUFReader(path)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert stored.tensor_type == QType.Q4_K
    raw = np.array(stored.data)
    assert np.array_equal(raw, quantize_tensor(w, QType.Q4_K, weights).numpy())
    assert not np.array_equal(raw, quantize_tensor(w, QType.Q4_K).numpy())
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields)[-6:] == ["general.quantization_version", "general.file_type", "quantize.imatrix.file",
                                 "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                                 "quantize.imatrix.chunks_count"]
    assert (fields["quantize.imatrix.file"], fields["quantize.imatrix.dataset"]) == (imatrix.path, "sample.txt")
    assert fields["quantize.imatrix.entries_count"] == len(imatrix.entries) == 7  # q k v o gate up down
    assert fields["quantize.imatrix.chunks_count"] == imatrix.chunk_count > 0
