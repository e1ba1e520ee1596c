"""Shared pieces of the GGUF tests: fixture checkpoints and conversions built once per session (K-quant
conversions take seconds on the shared CPU), and bindings to llama.cpp through llama-cpp-python."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gguf.convert import convert_to_gguf
from cpmkit.convert.gguf.imatrix import compute_gguf_imatrix, importance
from cpmkit.formats.gguf.imatrix import ImatrixData, read_imatrix, write_imatrix
from cpmkit.testing import build_checkpoint, longrope_factors

SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish? In 1603, 42 men paid 12.50 "
               "for 3 hats!  naive cafe\tend, don't   stop 1234567.")
# A LongRoPE config whose max_position_embeddings (128) is 4x original_max_position_embeddings (32), with
# different long and short factors: sequences longer than 32 use the long ones and cos/sin are scaled by
# sqrt(1 + ln 4 / ln 32), so the file must carry the original context and the attention factor.
LONGROPE_OVERRIDES = {"max_position_embeddings": 128,
                      "rope_scaling": {"rope_type": "longrope", "long_factor": longrope_factors(32, 8.0),
                                       "short_factor": [1.0] * 32, "original_max_position_embeddings": 32}}
# One layer with a 256-wide FFN: the smallest MiniCPM whose K-quant conversion still exercises the mixture
SMALL_OVERRIDES = {"num_hidden_layers": 1, "intermediate_size": 256}

_CACHE: dict[tuple, Path] = {}


def checkpoint(root: Path, variant: str, **kwargs) -> Checkpoint:
    key = ("ck", variant, repr(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = build_checkpoint(root / f"ck{len(_CACHE)}" / variant, variant, **kwargs)
    return Checkpoint.open(_CACHE[key])


def converted(root: Path, ck: Checkpoint, file_type: str, imatrix: ImatrixData | None = None) -> Path:
    """``ck`` converted to ``file_type`` once per session (with an imatrix: once per imatrix file)."""
    key = ("gguf", str(ck.root), file_type, None if imatrix is None else imatrix.path)
    if key not in _CACHE:
        _CACHE[key] = convert_to_gguf(ck, root / f"{ck.root.name}-{file_type}-{len(_CACHE)}.gguf", file_type=file_type,
                                      imatrix=imatrix)
    return _CACHE[key]


def small_imatrix_q4_k_m(root: Path) -> tuple[Checkpoint, ImatrixData, Path]:
    """A one-layer tied MiniCPM, an imatrix cpmkit computed for it (written and read back as a file) and its
    Q4_K_M conversion with that imatrix; built once per session."""
    ck = checkpoint(root, "minicpm-2b", config_overrides=SMALL_OVERRIDES)
    key = ("imatrix", str(ck.root))
    if key not in _CACHE:
        _CACHE[key] = root / "small-imatrix.gguf"
        write_imatrix(_CACHE[key], compute_gguf_imatrix(ck, SAMPLE_TEXT * 4, ctx=64, dataset="sample.txt"))
    imatrix = read_imatrix(_CACHE[key])
    return ck, imatrix, converted(root, ck, "Q4_K_M", imatrix)


def llama_logits(path: Path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """llama.cpp's float32 logits [T, V] for ``ids`` evaluated in one batch."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    finally:
        llm.close()


def llama_quantize(src: Path, dst: Path, llama_file_type: int, imatrix: ImatrixData | None = None) -> Path:
    """llama-quantize in process (``llama_model_quantize``), with an imatrix passed the way tools/quantize
    does: per-column weights from ``load_imatrix`` and the ``quantize.imatrix.*`` kv overrides."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_file_type
    params.nthread = 1
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.entries) + 1))()
        for i, (name, entry) in enumerate(imatrix.entries.items()):
            n_mat, cols = entry.sums.shape
            weights = importance(imatrix, name, (n_mat, 1, cols) if n_mat > 1 else (1, cols)).numpy()
            keep.append(weights)
            entries[i].name = name.encode()
            entries[i].data = weights.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = weights.size
        overrides = (llama_cpp.llama_model_kv_override * 5)()
        values = [("quantize.imatrix.file", "val_str", imatrix.path.encode()),
                  ("quantize.imatrix.dataset", "val_str", imatrix.datasets[0].encode()),
                  ("quantize.imatrix.entries_count", "val_i64", len(imatrix.entries)),
                  ("quantize.imatrix.chunks_count", "val_i64", imatrix.chunk_count)]
        for o, (key, field, value) in zip(overrides, values):
            o.key = key.encode()
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR if field == "val_str" else llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            setattr(o.value, field, value)
        params.imatrix = entries
        params.kv_overrides = overrides
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
    return dst


def reference_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|"""
    return float(np.abs(a - b).max() / np.abs(b).max())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())
