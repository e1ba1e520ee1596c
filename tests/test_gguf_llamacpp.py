"""cpmkit's GGUF files in llama.cpp itself (llama-cpp-python 0.3.36 and its vendored llama.cpp).

* Float files (F32/F16/BF16) against the BF16 reference forward of the checkpoint: same top-1 at every
  position and max |llama - ref| / max |ref| <= FLOAT_REL_TOL. llama.cpp's CPU matmuls round activations
  to the weights' 16-bit type; measured 7e-4 .. 5e-3.
* Quantized files against cpmkit's forward over the same stored weights (``load_gguf_model``):
  max rel. error <= QUANT_REL_TOL and top-1 agreement >= QUANT_TOP1. The remaining error is llama.cpp's own:
  it quantizes activations to Q8_K / Q8_0 for its integer dot products (measured 4e-3 .. 1.8e-2). For
  Q4_K_M the same logits are several times further from the BF16 reference (measured 8x), so the loader,
  not the reference, is what llama.cpp computes.
* Bytes: a quantized conversion equals llama-quantize (``llama_model_quantize``) run on cpmkit's BF16
  file, byte for byte, with and without an imatrix; the BF16 file itself was matched byte for byte
  against convert_hf_to_gguf.py while writing this (metadata checked key by key in test_gguf_convert.py).
* Tokenization: llama.cpp's ids equal cpmkit's Tokenizer ids for the SentencePiece and the BPE fixture.
"""

from __future__ import annotations

import pytest
import torch
from gguf import LlamaFileType
from gguf_helpers import (
    LONGROPE_OVERRIDES,
    SAMPLE_TEXT,
    checkpoint,
    converted,
    llama_logits,
    llama_quantize,
    llama_tokenize,
    reference_logits,
    rel_error,
    small_imatrix_q4_k_m,
    top1_agreement,
)

from cpmkit.convert.gguf.load import load_gguf_model
from cpmkit.models.reference import load_reference
from cpmkit.tokenizer import Tokenizer

pytest.importorskip("llama_cpp")

FLOAT_REL_TOL = 1e-2
QUANT_REL_TOL = 5e-2
QUANT_TOP1 = 0.9
CLOSER_THAN_REFERENCE = 2.0  # llama.cpp's logits are at least this much closer to the loader than to the reference
SEQ = 48  # > 32, the original context of the LongRoPE fixture: long factors on both sides


def _ids(ck) -> list[int]:
    return Tokenizer(ck.root, ck.config).encode(SAMPLE_TEXT)[:SEQ]


@pytest.mark.parametrize("variant,file_type,overrides", [
    ("minicpm-2b", "F16", None),  # tied head, no rope_theta
    ("minicpm4", "BF16", LONGROPE_OVERRIDES),  # untied, LongRoPE with max_position 4x the original
    ("minicpm3", "F32", None),
    ("minicpm5", "F16", None),
    ("minicpm-moe", "BF16", None),
])
def test_float_file_matches_reference(tmp_path_factory, variant, file_type, overrides):
    root = tmp_path_factory.mktemp("llamacpp")
    ck = checkpoint(root, variant, config_overrides=overrides)
    ids = _ids(ck)
    assert len(ids) == SEQ
    ours = llama_logits(converted(root, ck, file_type), ids)
    ref = reference_logits(load_reference(ck), ids)
    assert top1_agreement(ours, ref) == 1.0
    assert rel_error(ours, ref) <= FLOAT_REL_TOL


def _check_quantized(path, ck, weights_dominate: bool = False) -> None:
    ids = _ids(ck)
    llama = llama_logits(path, ids)
    model, spec = load_gguf_model(path)
    assert spec.num_layers == ck.spec.num_layers and spec.vocab_size == ck.spec.vocab_size
    ours = reference_logits(model, ids)
    ref = reference_logits(load_reference(ck), ids)
    assert rel_error(llama, ours) <= QUANT_REL_TOL
    assert top1_agreement(llama, ours) >= QUANT_TOP1
    if weights_dominate:  # 4-bit weights: their error dwarfs llama.cpp's activation rounding
        assert rel_error(llama, ref) >= CLOSER_THAN_REFERENCE * rel_error(llama, ours)


def test_q4_k_m_with_imatrix_is_llama_quantize(tmp_path_factory):
    """Tied MiniCPM (one layer): imatrix computed by cpmkit, then the Q4_K_M file is byte-identical to
    llama-quantize with that imatrix, and llama.cpp runs it as cpmkit's loader does."""
    root = tmp_path_factory.mktemp("llamacpp")
    ck, imatrix, ours = small_imatrix_q4_k_m(root)
    theirs = llama_quantize(converted(root, ck, "BF16"), root / "llama-q4_k_m.gguf", LlamaFileType.MOSTLY_Q4_K_M,
                            imatrix)
    assert ours.read_bytes() == theirs.read_bytes()
    _check_quantized(ours, ck, weights_dominate=True)


@pytest.mark.parametrize("variant,file_type,llama_type", [
    ("minicpm5", "Q8_0", LlamaFileType.MOSTLY_Q8_0),
    ("minicpm-moe", "Q8_0", LlamaFileType.MOSTLY_Q8_0),  # merged experts, quantized expert by expert
    ("bitcpm4", "TQ2_0", LlamaFileType.MOSTLY_TQ2_0),  # ternary per row: TQ2_0 linears, Q6_K tied embedding
])
def test_quantized_file_is_llama_quantize(tmp_path_factory, variant, file_type, llama_type):
    root = tmp_path_factory.mktemp("llamacpp")
    ck = checkpoint(root, variant)
    ours = converted(root, ck, file_type)
    theirs = llama_quantize(converted(root, ck, "BF16"), root / f"llama-{file_type}.gguf", llama_type)
    assert ours.read_bytes() == theirs.read_bytes()
    _check_quantized(ours, ck)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_llama_cpp_runs_ternary_files_with_the_reference_top1(tmp_path_factory, granularity):
    """BitCPM's ternary linears are exact in TQ1_0 and TQ2_0: llama.cpp's next-token choices are the BF16
    reference's everywhere (what remains is the Q6_K embedding llama-quantize gives TQ files, and llama.cpp's
    float16 activations: about 1 % of the logits)."""
    root = tmp_path_factory.mktemp("llamacpp")
    ck = checkpoint(root, "bitcpm4", ternary=granularity)
    ids = _ids(ck)
    ref = reference_logits(load_reference(ck), ids)
    for file_type in ("TQ2_0", "TQ1_0"):
        ours = llama_logits(converted(root, ck, file_type), ids)
        assert top1_agreement(ours, ref) == 1.0, file_type
        assert rel_error(ours, ref) <= 2 * FLOAT_REL_TOL, file_type


@pytest.mark.parametrize("variant", ["minicpm4", "minicpm5"])  # SentencePiece with added tokens; BPE
def test_tokenization_matches(tmp_path_factory, variant):
    root = tmp_path_factory.mktemp("llamacpp")
    ck = checkpoint(root, variant)
    tok = Tokenizer(ck.root, ck.config)
    text = SAMPLE_TEXT + " \u00c6\u00d8\u00c5 \u4f60\u597d \U0001f600\n\n\n  x"
    assert llama_tokenize(converted(root, ck, "F16"), text, add_bos=tok.special.add_bos) == tok.encode(text)


def test_loader_reads_llama_cpp_files_like_llama_cpp(tmp_path_factory):
    """A file llama-quantize wrote (not cpmkit) loads into the reference model and runs as llama.cpp does."""
    root = tmp_path_factory.mktemp("llamacpp")
    ck = checkpoint(root, "minicpm3")
    theirs = llama_quantize(converted(root, ck, "F32"), root / "llama-q8_0.gguf", LlamaFileType.MOSTLY_Q8_0)
    model, spec = load_gguf_model(theirs)
    assert spec.mla is not None and spec.mla.latent_norm_eps == pytest.approx(1e-5)  # llama.cpp's eps
    with torch.no_grad():
        assert model.model.layers[0].self_attn.q_b_proj.fmt.qtype.name == "Q8_0"
    _check_quantized(theirs, ck)
