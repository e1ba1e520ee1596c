"""The BF16 reference: a checkpoint's weights, exactly as stored, run by cpmkit's torch forward."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.models import CausalLM, build_model
from cpmkit.models.source import ModelSource

# Activations (and so every matmul) run in float32, which represents every bf16/fp16 weight exactly and is
# the fast path of CPU BLAS; the weights themselves stay in their stored dtype.
COMPUTE_DTYPE = torch.float32


def stored_dtype(ck: Checkpoint) -> torch.dtype:
    """The dtype the checkpoint's float weights are kept in: theirs when they share one, else float32 (which
    holds each of bf16 and fp16 exactly)."""
    dtypes = {ref.dtype for ref in ck.tensors.values() if ref.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def checkpoint_source(ck: Checkpoint, dtype: torch.dtype = COMPUTE_DTYPE) -> ModelSource:
    """The checkpoint as a lazily read model running in ``dtype``, its weights in their stored dtype."""
    weight_dtype = stored_dtype(ck)

    def build() -> CausalLM:
        return build_model(ck.spec, dtype=dtype, weight_dtype=weight_dtype)

    def read(names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ck.stream(list(names))

    return ModelSource(ck.spec, build, read)


def load_reference(ck: Checkpoint, dtype: torch.dtype = COMPUTE_DTYPE, progress=iter) -> CausalLM:
    """The whole reference model (for a model that fits in memory: use the streamed runner otherwise)."""
    return checkpoint_source(ck, dtype).load(progress)
