"""GGUF block packers / dequantizers and the non-K quantizers against gguf-py (an independent numpy
implementation of ggml's reference quantizers and of every dequantizer)."""

import os
import signal

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.convert.gguf import quantize as gguf_quantize
from cpmkit.convert.gguf.quantize import (
    QuantizeWorkers,
    dequantize_tensor,
    quantize_tensor,
)
from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.blocks import block_type, dequantize
from cpmkit.formats.gguf.layout import BLOCKS

GGUF_PY_QUANTIZES = [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
                     QType.TQ1_0, QType.TQ2_0]
ROW_LENGTHS = [1536, 2304, 4096, 5760]  # MiniCPM hidden / intermediate sizes


def real_shaped(cols: int, rows: int = 6, seed: int = 0) -> torch.Tensor:
    """Weight-like rows plus the awkward ones: zero, all negative, one huge outlier."""
    g = torch.Generator().manual_seed(seed + cols)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0] = 0.0
    w[1] = -w[1].abs()
    w[2, cols // 3] = 40.0
    w[3] = torch.randn(cols, generator=g) * torch.exp(torch.randn(cols, generator=g) * 2)
    return w


def test_layout_sizes_match_gguf_py():
    for qtype, lay in BLOCKS.items():
        assert (lay.block_size, lay.type_size) == gguf.GGML_QUANT_SIZES[qtype], qtype.name


@pytest.mark.parametrize("qtype, cols", [(q, c) for q in GGUF_PY_QUANTIZES for c in ROW_LENGTHS
                                         if c % BLOCKS[q].block_size == 0], ids=lambda v: getattr(v, "name", v))
def test_quantize_matches_gguf_py(qtype, cols):
    w = real_shaped(cols)
    ours = quantize_tensor(w, qtype)
    ref = gguf.quants.quantize(w.numpy(), qtype).view(np.uint8).reshape(w.shape[0], -1)
    assert np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda q: q.name)
def test_dequantize_matches_gguf_py(qtype):
    """On random bytes (every bit pattern of codes and 6-bit scales; fp16 scales kept finite)."""
    lay = BLOCKS[qtype]
    g = torch.Generator().manual_seed(int(qtype))
    raw = torch.randint(0, 256, (300, lay.type_size), dtype=torch.uint8, generator=g)
    for f in lay.fields:  # replace every float field by finite values
        if f.dtype in ("f16", "f32"):
            start = lay.offset(f.name)
            dtype = torch.float16 if f.dtype == "f16" else torch.float32
            values = (torch.randn(300, f.count, generator=g) * 0.1).to(dtype)
            raw[:, start : start + f.nbytes] = values.view(torch.uint8)
    if qtype == QType.BF16:
        raw = (torch.randn(300, 1, generator=g) * 3).to(torch.bfloat16).view(torch.uint8)
    ours = dequantize(raw, qtype)
    ref = gguf.quants.dequantize(raw.numpy(), qtype).reshape(300, -1)
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", [q for q in BLOCKS if q not in (QType.F32,)], ids=lambda q: q.name)
def test_dequantize_tensor_of_our_bytes_matches_gguf_py(qtype):
    w = real_shaped(2304 if BLOCKS[qtype].block_size == 32 else 1536, rows=4)
    raw = quantize_tensor(w, qtype)
    ours = dequantize_tensor(raw, qtype, tuple(w.shape))
    ref = gguf.quants.dequantize(raw.numpy(), qtype)
    assert np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("qtype", [QType.TQ1_0, QType.TQ2_0], ids=lambda q: q.name)
def test_ternary_bitcpm_tensor_round_trips_losslessly(qtype):
    """BitCPM-style weights: values in {-s, 0, +s} with one fp16-exact s per output row."""
    g = torch.Generator().manual_seed(7)
    trits = torch.randint(-1, 2, (64, 1536), generator=g).float()
    trits[5, :256] = 0.0  # an all-zero block (d = 0)
    s = (torch.rand(64, 1, generator=g) * 0.05 + 0.005).half().float()
    w = (trits * s).to(torch.bfloat16)  # as the checkpoint stores it
    back = dequantize_tensor(quantize_tensor(w, qtype), qtype, tuple(w.shape))
    assert torch.equal(back, w.float())


def test_quantize_tensor_rejects_bad_input():
    with pytest.raises(CpmkitError, match="multiple of the Q4_K block size 256"):
        quantize_tensor(torch.zeros(4, 640), QType.Q4_K, name="blk.0.ffn_down.weight")
    w = torch.zeros(4, 256)
    w[2, 7] = float("nan")
    with pytest.raises(CpmkitError, match="NaN or Inf"):
        quantize_tensor(w, QType.Q8_0)
    with pytest.raises(CpmkitError, match="imatrix has 100 values"):
        quantize_tensor(torch.zeros(4, 256), QType.Q4_K, imatrix=torch.ones(100))
    with pytest.raises(CpmkitError, match="imatrix contains NaN"):
        quantize_tensor(torch.zeros(4, 256), QType.Q4_K, imatrix=torch.full((256,), float("inf")))
    with pytest.raises(CpmkitError, match="supported"):
        quantize_tensor(torch.zeros(4, 256), QType.IQ4_NL)
    with pytest.raises(CpmkitError, match="does not fit shape"):
        dequantize_tensor(torch.zeros(10, dtype=torch.uint8), QType.Q8_0, (2, 32))


def test_block_type_registry_lists_supported_types():
    with pytest.raises(CpmkitError, match="Q4_K"):
        block_type(QType.IQ2_XXS)
    assert {block_type(q).qtype for q in BLOCKS} == set(BLOCKS)


def test_moe_tensor_quantizes_expert_by_expert_with_its_imatrix_slice():
    w = real_shaped(256, rows=8).reshape(2, 4, 256)
    imatrix = torch.rand(2, 256, generator=torch.Generator().manual_seed(3)) + 0.1
    both = quantize_tensor(w, QType.Q4_K, imatrix)
    for e in range(2):
        assert torch.equal(both[e], quantize_tensor(w[e], QType.Q4_K, imatrix[e]))


def test_worker_processes_write_the_same_bytes_and_report_bad_rows(monkeypatch):
    """Worker processes quantize tasks of rows (here 4 rows each, so a 3-D tensor with imatrix spreads over
    many); the bytes equal the in-process ones, and NaN in a worker's task surfaces as the one-line error."""
    monkeypatch.setattr(gguf_quantize, "TASK_ELEMENTS", 4 * 256)
    w = real_shaped(256, rows=24, seed=5).to(torch.bfloat16).reshape(2, 12, 256)
    imatrix = torch.rand(2, 256, generator=torch.Generator().manual_seed(4)) + 0.1
    with QuantizeWorkers(2) as pool:
        for qtype in (QType.Q4_K, QType.Q6_K, QType.Q8_0):
            pooled = np.concatenate(list(pool.submit(w, qtype, imatrix)))
            assert np.array_equal(pooled, quantize_tensor(w, qtype, imatrix).reshape(24, -1).numpy())
        bad = w.clone()
        bad[1, 9, 3] = float("inf")
        with pytest.raises(CpmkitError, match=r"blk.0.ffn_up_exps.weight: contains NaN or Inf \(rows 8..11\)"):
            list(pool.submit(bad, QType.Q4_K, name="blk.0.ffn_up_exps.weight"))


def test_a_killed_worker_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(gguf_quantize, "TASK_ELEMENTS", 4 * 256)
    w = torch.randn(2048, 256)
    with QuantizeWorkers(2) as pool:
        chunks = pool.submit(w, QType.Q4_K, name="blk.3.ffn_gate.weight")
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(CpmkitError, match="blk.3.ffn_gate.weight: a quantizer worker process died"):
            list(chunks)
