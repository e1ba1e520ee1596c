"""Triton dequant-GEMM kernels for every weight format cpmkit writes, and their CPU fallback.

Importing this package loads neither triton nor CUDA. The Triton side (``cpmkit.kernels.dispatch``:
``quant_matmul``, ``choose_strategy``, ``TuneCache``, ``autotune``; the strategy files
``gemv_splitk`` and ``gemm_tiled``) is imported on first use.
"""

from cpmkit.kernels.layout import AffineLayout, PackedWeight
from cpmkit.kernels.linear import Backend, GGUFWeight, MLXAffineWeight, QuantLinear
from cpmkit.kernels.repack import GGUF_KERNEL_TYPES, pack_gguf, pack_mlx

__all__ = ["AffineLayout", "Backend", "GGUFWeight", "GGUF_KERNEL_TYPES", "MLXAffineWeight", "PackedWeight",
           "QuantLinear", "pack_gguf", "pack_mlx"]
