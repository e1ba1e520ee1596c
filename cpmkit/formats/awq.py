"""AutoAWQ's bytes (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §3): 4-bit codes with a zero point per group of
``G`` input features, ``value = (q - zero) * scale``, groups always contiguous (no g_idx).

* GEMM (``version: "gemm"``, what vLLM's awq/awq_marlin and transformers read): ``qweight`` int32 ``[K, N/8]``
  packed along N with nibble ``i`` of word ``j`` holding column ``8 j + ORDER[i]``; ``qzeros`` int32
  ``[K/G, N/8]`` packed the same way (no offset); ``scales`` float16 ``[K/G, N]``.
* GEMV (``version: "gemv"``): ``qweight`` int32 ``[N, K/8]`` packed along K in natural order; ``qzeros`` int32
  ``[N, W]`` and ``scales`` float16 ``[N, 8 W]`` per output row, the group columns padded with zeros to
  ``W = ceil(ceil(K/G) / 8)`` rounded up to a multiple of 1 (G >= 128), 2 (G = 64) or 4 (G = 32).

``quantization_config``: ``{"quant_method": "awq", "zero_point": true, "group_size": G, "bits": 4, "version":
"gemm", "modules_to_not_convert": null}``, as AutoAWQ's ``AwqConfig.to_transformers_dict`` writes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cpmkit.errors import CpmkitError

BITS = 4
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a GEMM word holds column 8 j + ORDER[i]
VERSIONS = ("gemm", "gemv")
GEMV_GROUP_MULTIPLE = {32: 4, 64: 2}  # groups >= 128: 1


def _pack_words(codes: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Integers ``[R, C]`` in 0..15 -> int32 ``[R, C/8]``, nibble i of word j = column 8 j + order[i]."""
    rows, cols = codes.shape
    fields = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(order)]
    words = (fields << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack_words(words: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``_pack_words``: uint8 ``[R, 8 C]``."""
    rows, cols = words.shape
    fields = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 15
    out = torch.empty_like(fields)
    out[:, :, list(order)] = fields
    return out.reshape(rows, cols * 8).to(torch.uint8)


def pack_gemm(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 ``[N, K]``, zeros ``[N, K/G]`` -> (qweight ``[K, N/8]``, qzeros ``[K/G, N/8]``)."""
    return _pack_words(codes.T.contiguous(), ORDER), _pack_words(zeros.T.contiguous(), ORDER)


def unpack_gemm(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[N, K]``, zeros ``[N, K/G]``) from GEMM tensors."""
    return _unpack_words(qweight, ORDER).T, _unpack_words(qzeros, ORDER).T


def gemv_zeros_width(k: int, group_size: int) -> int:
    if group_size < 128 and group_size not in GEMV_GROUP_MULTIPLE:
        raise CpmkitError(f"AutoAWQ's GEMV layout takes groups of 32, 64 or at least 128, not {group_size}")
    multiple = GEMV_GROUP_MULTIPLE.get(group_size, 1)
    width = math.ceil(math.ceil(k / group_size) / 8)
    return math.ceil(width / multiple) * multiple


def pack_gemv(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes ``[N, K]``, zeros and scales ``[N, K/G]`` -> (qweight ``[N, K/8]``, qzeros ``[N, W]``, scales
    float16 ``[N, 8 W]``)."""
    n, k = codes.shape
    width = gemv_zeros_width(k, group_size)
    padded_zeros = torch.zeros(n, 8 * width, dtype=torch.int64)
    padded_zeros[:, : zeros.shape[1]] = zeros.to(torch.int64)
    padded_scales = torch.zeros(n, 8 * width, dtype=torch.float16)
    padded_scales[:, : scales.shape[1]] = scales.to(torch.float16)
    natural = tuple(range(8))
    return _pack_words(codes, natural), _pack_words(padded_zeros, natural), padded_scales


def unpack_gemv(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    natural = tuple(range(8))
    return (_unpack_words(qweight, natural), _unpack_words(qzeros, natural)[:, :groups],
            scales[:, :groups])


def awq_quantization_config(*, group_size: int, version: str) -> dict[str, Any]:
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": BITS, "version": version,
            "modules_to_not_convert": None}
