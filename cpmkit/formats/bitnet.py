"""transformers' BitNet layout (``quant_method: bitnet``): the bytes of a ternary linear with one scale per tensor.

Per linear ``[N, K]``, as transformers' ``integrations/bitnet.py`` packs and unpacks it:

* ``weight``: uint8 ``[ceil(N / 4), K]``; the code ``t + 1`` of row ``n`` sits in bits ``2 (n // R)`` of row
  ``n % R``, ``R = ceil(N / 4)`` (rows are packed in four bands, not along K);
* ``weight_scale``: ``[1]`` in the model's dtype.

With ``linear_class: autobitlinear`` and ``quantization_mode: offline`` (what cpmkit writes) transformers unpacks
the codes to ``t`` in the model's dtype and multiplies the output by ``weight_scale``: ``W = t * s``, exact. With
``linear_class: bitlinear`` it divides by it instead (``W = t / s``), which cpmkit reads but does not write: ``1/s``
is not exact in bf16. Either way transformers quantizes the activations to int8 per token before the product
(BitNet b1.58's runtime), so its outputs are not the BF16 model's even where the weights are.
"""

from __future__ import annotations

import torch

from cpmkit.errors import CpmkitError

METHOD = "bitnet"
BANDS = 4  # rows of codes per stored row
LINEAR_CLASSES = {"autobitlinear": "multiply", "bitlinear": "divide"}


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (0..2) -> uint8 ``[ceil(N / 4), K]`` in four bands of rows."""
    n, k = codes.shape
    rows = -(-n // BANDS)
    packed = torch.zeros((rows, k), dtype=torch.uint8, device=codes.device)
    for band in range(BANDS):
        part = codes[band * rows : (band + 1) * rows].to(torch.uint8)
        packed[: part.shape[0]] |= part << (2 * band)
    return packed


def unpack_row_range(packed: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
    """uint8 codes of rows ``[start, stop)`` of an ``n``-row weight, reading only those rows' bands."""
    rows = torch.arange(start, min(stop, n), device=packed.device)
    bands = -(-n // BANDS)
    return (packed[rows % bands] >> (2 * (rows // bands)).to(torch.uint8)[:, None]) & 3


def unpack_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``[ceil(n / 4), K]`` -> uint8 codes ``[n, K]``."""
    return unpack_row_range(packed, n, 0, n)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, n: int, linear_class: str = "autobitlinear",
               rows: tuple[int, int] | None = None):
    """float32 ``[n, K]`` (or rows ``[start, stop)``): ``t * s`` (autobitlinear; exactly the stored values) or
    ``t / s`` (bitlinear)."""
    codes = unpack_row_range(packed, n, *(rows or (0, n)))
    trits = codes.float() - 1
    return trits * scale.float() if LINEAR_CLASSES[linear_class] == "multiply" else trits / scale.float()


def quantization_config(ignore: list[str]) -> dict:
    return {"quant_method": METHOD, "linear_class": "autobitlinear", "quantization_mode": "offline",
            "use_rms_norm": False, "modules_to_not_convert": ignore}


def read_quantization_config(config: dict, where: str) -> dict:
    """A BitNet ``quantization_config`` that cpmkit can read (offline, without the in-linear RMSNorm), checked."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != METHOD:
        raise CpmkitError(f"{where}: quantization_config.quant_method is not {METHOD!r}")
    linear_class = q.get("linear_class", "bitlinear")
    if linear_class not in LINEAR_CLASSES or q.get("quantization_mode", "offline") != "offline":
        raise CpmkitError(f"{where}: BitNet linear_class {linear_class!r}, quantization_mode "
                          f"{q.get('quantization_mode')!r}; cpmkit reads autobitlinear or bitlinear, offline")
    if q.get("use_rms_norm"):
        raise CpmkitError(f"{where}: BitNet use_rms_norm puts an RMSNorm inside every linear, which this model "
                          "does not have")
    return {**q, "linear_class": linear_class}
