"""Triton dequant-GEMM kernels over one affine weight layout, and their CPU fallback; they know no model and
no format (each format's plug-in brings its weight type and repack into :class:`AffineCodes`).

Importing this package loads neither triton nor CUDA. The Triton side (``cpmkit.kernels.dispatch``:
``quant_matmul``, ``choose_strategy``, ``TuneCache``, ``autotune``; the strategy files ``gemv_stream``,
``gemv_splitk``, ``gemm_tiled`` and ``dequant``, with ``trits`` for TQ1_0's stored form and ``splitk`` for the
in-kernel split-K sums) is imported on first use; ``static`` compiles them for a GPU that is not here and reads
their machine code. ``linear.fused_forward`` runs linears that share an input (q/k/v, gate/up) as one launch.
"""

from cpmkit.kernels.layout import AffineCodes, AffineLayout, PackedWeight, pack_affine
from cpmkit.kernels.linear import Backend, QuantLinear, WeightFormat

__all__ = ["AffineCodes", "AffineLayout", "Backend", "PackedWeight", "QuantLinear", "WeightFormat", "pack_affine"]
