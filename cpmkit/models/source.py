"""A model read lazily: a meta-device skeleton and the tensors that fill it, by name.

Every model cpmkit runs (the reference checkpoint, a GGUF file, an MLX folder, ...) is one
:class:`ModelSource`. ``load()`` fills the whole skeleton; the layer-streamed runner
(``cpmkit.models.streamed``) fills one part at a time (the embedding, one decoder block, the head) and
empties it again, so a model larger than memory still runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from cpmkit.models.causal_lm import CausalLM
from cpmkit.spec import ModelSpec

TensorReader = Callable[[Sequence[str]], Iterator[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class ModelSource:
    """``build()`` makes a new skeleton (on the meta device, its quantized modules holding placeholders);
    ``read(names)`` yields ``(name, tensor)`` for those of the skeleton's state_dict names, one at a time,
    in the order asked."""

    spec: ModelSpec
    build: Callable[[], CausalLM]
    read: TensorReader

    def load(self, progress: Callable[[Iterable], Iterable] = iter) -> CausalLM:
        """The whole model, every tensor read once."""
        model = self.build()
        model.load_weights(progress(self.read(model.tensor_names())))
        return model.eval()
