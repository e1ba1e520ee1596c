"""The BF16 reference: a checkpoint's weights, exactly as stored, run by cpmkit's torch forward."""

from __future__ import annotations

import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.models import build_model

# Weights keep their stored values; matmuls run in float32, which represents every bf16/fp16 value exactly
# and is the fast path of CPU BLAS.
COMPUTE_DTYPE = torch.float32


def load_reference(ck: Checkpoint, dtype: torch.dtype = COMPUTE_DTYPE, progress=iter):
    model = build_model(ck.spec, dtype=dtype)
    model.load_weights(progress(ck.stream()))
    return model.eval()
