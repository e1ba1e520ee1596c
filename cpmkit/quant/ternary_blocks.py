"""TQ1_0 / TQ2_0 quantizers (quantize_row_tq{1,2}_0_ref): value = d*t, t in {-1, 0, +1}.

d is the absolute maximum of each 256-element block and t = lroundf(x/d) (half away from zero), so a
block that already holds {-s, 0, +s} for one s (BitNet / BitCPM ternary weights with one scale per
row or per >= 256-aligned group) round-trips exactly. The importance vector is ignored, as in ggml.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.constants import QK_K

from cpmkit.quant.blocks import QuantizedBlocks
from cpmkit.quant.ggml_float import lroundf, rdiv


def _ternarize(qtype: QType, x: np.ndarray) -> QuantizedBlocks:
    xb = x.reshape(-1, QK_K)
    d = np.abs(xb).max(1)
    inv = np.where(d != 0, rdiv(1.0, d), np.float32(0))
    trits = lroundf(xb * inv[:, None]) + 1  # -1, 0, 1 -> 0, 1, 2
    return QuantizedBlocks(qtype, torch.from_numpy(trits.astype(np.uint8)), d=torch.from_numpy(d).half())


def quantize_tq1_0(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    return _ternarize(QType.TQ1_0, x)


def quantize_tq2_0(x: np.ndarray, quant_weights: np.ndarray | None) -> QuantizedBlocks:
    return _ternarize(QType.TQ2_0, x)


QUANTIZERS = {QType.TQ1_0: quantize_tq1_0, QType.TQ2_0: quantize_tq2_0}
