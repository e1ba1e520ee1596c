"""ctypes binding to llama.cpp's own C quantizer, the reference our GGUF quantizers are tested against.

Loads ``libggml-base.so`` bundled with llama-cpp-python and calls ``ggml_quantize_chunk`` (ggml.h):
``size_t ggml_quantize_chunk(enum ggml_type type, const float *src, void *dst, int64_t start,
int64_t nrows, int64_t n_per_row, const float *imatrix)``. ``ggml_type`` ids equal gguf-py's
``GGMLQuantizationType`` values. Import this module only after ``pytest.importorskip("llama_cpp")``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType


@functools.cache
def _lib() -> ctypes.CDLL:
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(x: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize float32 ``x`` ``(rows, n_per_row)`` with llama.cpp; returns uint8 ``(rows, row_bytes)``.
    ``imatrix`` is the per-column importance vector ``(n_per_row,)``, used for every row as
    llama-quantize does."""
    lib = _lib()
    src = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    rows, n_per_row = src.shape
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    dst = np.zeros((rows, row_bytes), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(
        int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row,
        None if qw is None else qw.ctypes.data,
    )
    assert written == rows * row_bytes, (written, rows, row_bytes)
    return torch.from_numpy(dst)
