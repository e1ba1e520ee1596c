"""Quantize / dequantize whole tensors to GGUF types: the glue between ``cpmkit.quant`` (codes and
scales) and ``cpmkit.formats.gguf.blocks`` (bytes), producing exactly what llama-quantize writes.

Rows are processed in bounded chunks, so memory stays proportional to ``QUANT_CHUNK_ELEMENTS`` on top of
the input and output. A 3-D tensor ``(n_expert, rows, cols)`` (MoE ``*_exps``) is quantized expert by
expert, with the expert's slice of the importance matrix, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.blocks import block_type, dequantize
from cpmkit.formats.gguf.quantized import QuantizedBlocks
from cpmkit.quant import kquants, legacy, ternary_blocks

Quantizer = Callable[[torch.Tensor, "torch.Tensor | None"], QuantizedBlocks]

QUANTIZERS: dict[QType, Quantizer] = {**legacy.QUANTIZERS, **kquants.QUANTIZERS, **ternary_blocks.QUANTIZERS}
assert len(QUANTIZERS) == len(legacy.QUANTIZERS) + len(kquants.QUANTIZERS) + len(ternary_blocks.QUANTIZERS)

QUANT_CHUNK_ELEMENTS = 1 << 18  # float32 weights quantized per call (1 MiB): bounds the search temporaries


def _quantizer(qtype: QType) -> Quantizer:
    try:
        return QUANTIZERS[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in QUANTIZERS)
        raise CpmkitError(f"cannot quantize to GGUF type {qtype.name}; supported: {supported}") from None


def quantize_tensor(w: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None = None,
                    name: str = "tensor") -> torch.Tensor:
    """Quantize ``w`` ``[rows, cols]`` (or ``[n_expert, rows, cols]``, any float dtype, converted to
    float32 like llama.cpp) along ``cols``; returns uint8 ``[..., rows, row_bytes]``.

    ``imatrix``: per-column importance, ``[cols]`` (``[n_expert * cols]`` or ``[n_expert, cols]`` for
    3-D); selects the imatrix (``_impl``) paths for the types that use it."""
    quantize = _quantizer(qtype)
    lay = block_type(qtype).layout
    if w.dim() not in (2, 3) or not w.is_floating_point():
        raise CpmkitError(f"{name}: expected a 2-D or 3-D float tensor, got {w.dtype} {tuple(w.shape)}")
    cols = w.shape[-1]
    if cols % lay.block_size:
        raise CpmkitError(f"{name}: row length {cols} is not a multiple of the {qtype.name} block size "
                          f"{lay.block_size}; pick another type for this tensor")
    experts = w.shape[0] if w.dim() == 3 else 1
    x = w.detach().to(torch.float32).reshape(experts, -1, cols)
    qw = None
    if imatrix is not None:
        if imatrix.numel() != experts * cols:
            raise CpmkitError(f"{name}: imatrix has {imatrix.numel()} values, expected {experts * cols} "
                              f"({experts} x {cols} columns)")
        qw = imatrix.detach().to(torch.float32).reshape(experts, cols)
        if not bool(torch.isfinite(qw).all()):
            raise CpmkitError(f"{name}: imatrix contains NaN or Inf (llama-quantize rejects it too)")

    rows = x.shape[1]
    out = torch.empty(experts, rows, lay.row_bytes(cols), dtype=torch.uint8)
    step = max(1, QUANT_CHUNK_ELEMENTS // cols)
    pack = block_type(qtype).pack
    for e in range(experts):
        for r in range(0, rows, step):
            chunk = x[e, r : r + step].contiguous()
            if not bool(torch.isfinite(torch.stack(torch.aminmax(chunk))).all()):  # NaN propagates
                raise CpmkitError(f"{name}: contains NaN or Inf (rows {r}..{r + chunk.shape[0] - 1}); "
                                  "llama.cpp refuses such data too")
            raw = pack(quantize(chunk, None if qw is None else qw[e]))
            out[e, r : r + step] = raw.reshape(chunk.shape[0], -1)
    return out.reshape(*w.shape[:-1], -1)


def dequantize_tensor(raw: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 GGUF data -> float32 tensor of ``shape`` (the element shape, last dim = row length)."""
    lay = block_type(qtype).layout
    if not shape or shape[-1] % lay.block_size:
        raise CpmkitError(f"cannot view {qtype.name} data as shape {tuple(shape)}: the row length must be "
                          f"a multiple of {lay.block_size}")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    expected = n_rows * lay.row_bytes(shape[-1])
    if raw.numel() != expected:
        raise CpmkitError(f"{qtype.name} data of {raw.numel()} bytes does not fit shape {tuple(shape)} "
                          f"({expected} bytes)")
    return dequantize(raw.reshape(n_rows, -1), qtype).reshape(shape)
