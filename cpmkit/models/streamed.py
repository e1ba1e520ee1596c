"""The layer-streamed runner: a model run over a set of sequences one part at a time, so a model larger than
memory (an 8B checkpoint on a 24 GB machine, or on a GPU smaller than it) still runs.

Parts, in order: the embedding, each decoder block, the head (final norm and lm_head). A part's tensors are
read from the :class:`~cpmkit.models.source.ModelSource` (a checkpoint, a GGUF file, an MLX folder), moved
to the device, run over every sequence, and dropped before the next part is read; the hidden states of all
sequences wait between parts in a :class:`HiddenStore` (on the device while they fit, else in host memory,
else in a memory-mapped file). Weights stay in their stored dtype (a checkpoint's bf16, an artifact's
quantized bytes) and are converted as they are used; activations, norms, attention and log-probs are in the
runner's dtype (float32 for scoring).

Two ways to use it:

* :meth:`StreamedRunner.logits` yields each sequence's float32 logits at the positions asked for (the
  scored half of a perplexity window), after the whole stack has run: ``eval`` and ``verify``;
* :meth:`StreamedRunner.calibrate` hands each block, before its outputs are computed, to a
  :class:`BlockVisitor`, which may run the block over the sequences with hooks on its linears (each hook
  sees that linear's inputs; a MoE expert's, only the tokens routed to it) and replace its linears with
  quantized ones: the block's outputs, computed after the visitor returns, feed the next block. The
  importance matrix, GPTQ and AWQ calibrate this way.
"""

from __future__ import annotations

import ctypes
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from cpmkit.errors import CpmkitError
from cpmkit.models.causal_lm import CausalLM
from cpmkit.models.source import ModelSource

Progress = Callable[[Iterable], Iterable]
# Quantized weights of a block are kept dequantized for its whole pass (one dequantization instead of one per
# sequence) while they take at most this much memory; larger blocks dequantize a row chunk at a time per call.
CACHE_BLOCK_BYTES = 256 << 20
_LIBC = ctypes.CDLL(None)
HOST_HIDDEN_BYTES = 4 << 30  # hidden states of all sequences kept in host memory up to this, else on disk
DEVICE_HIDDEN_FRACTION = 0.25  # of the GPU's free memory, for hidden states kept on the device


class HiddenStore:
    """The hidden state of every sequence between two parts: ``n`` tensors of ``shape`` and ``dtype``, on the
    device when they fit in ``device_budget`` bytes, else in host memory up to ``host_budget``, else in a
    memory-mapped temporary file (removed on close)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
                 device_budget: int | None = None, host_budget: int = HOST_HIDDEN_BYTES):
        self.shape, self.dtype, self.device = shape, dtype, device
        nbytes = n * math.prod(shape) * dtype.itemsize
        if device.type != "cpu" and nbytes <= (device_budget if device_budget is not None else _device_budget(device)):
            self.where = "device"
        elif nbytes <= host_budget:
            self.where = "host"
        else:
            self.where = "disk"
        self._tensors: list[torch.Tensor | None] = [None] * n
        self._file: tempfile._TemporaryFileWrapper | None = None
        self._map: np.memmap | None = None
        if self.where == "disk":
            self._file = tempfile.NamedTemporaryFile(prefix="cpmkit-hidden-", suffix=".bin")
            numpy_dtype = np.float32 if dtype == torch.float32 else np.uint16  # bf16/fp16 stored as their bits
            self._map = np.memmap(self._file.name, dtype=numpy_dtype, mode="w+", shape=(n, *shape))

    def __len__(self) -> int:
        return len(self._tensors)

    def get(self, i: int) -> torch.Tensor:
        if self._map is not None:
            raw = torch.from_numpy(np.array(self._map[i]))
            return (raw if self.dtype == torch.float32 else raw.view(self.dtype)).to(self.device)
        return self._tensors[i].to(self.device)

    def put(self, i: int, value: torch.Tensor) -> None:
        value = value.detach().to(self.dtype)
        if self._map is not None:
            cpu = value.cpu()
            self._map[i] = (cpu if self.dtype == torch.float32 else cpu.view(torch.int16)).numpy()
        else:
            self._tensors[i] = value if self.where == "device" else value.cpu()

    def close(self) -> None:
        self._tensors = []
        self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _device_budget(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_HIDDEN_FRACTION)


class BlockVisitor(Protocol):
    """Sees each decoder block before its outputs are computed (see :meth:`StreamedRunner.calibrate`)."""

    def visit(self, index: int, block: nn.Module, run: BlockPass) -> None: ...


class _PassDone(Exception):
    """Raised inside a block's forward once every hooked module has seen its input: the rest of the block's
    computation would only be thrown away."""


@dataclass
class BlockPass:
    """Runs one block over every sequence, with forward pre-hooks on named modules of the block:
    ``hooks[name](x)`` receives each input that module sees (names relative to the block, e.g.
    ``self_attn.q_proj``, ``mlp.experts.3.w1``). Calling it discards the outputs, and stops each forward as soon
    as every hooked module has had its input (a pass for q/k/v runs only the input norm); :meth:`advance`
    runs the whole block and stores its outputs as the next block's inputs (then the runner does not run the
    block again)."""

    block: nn.Module
    store: HiddenStore
    cos: torch.Tensor
    sin: torch.Tensor
    batch: int = 1
    advanced: bool = False

    def __call__(self, hooks: dict[str, Callable[[torch.Tensor], None]] | None = None) -> None:
        hooks = hooks or {}
        seen: set[str] = set()

        def observe(name: str, fn: Callable[[torch.Tensor], None], x: torch.Tensor) -> None:
            fn(x)
            seen.add(name)
            if len(seen) == len(hooks):
                raise _PassDone

        with self._hooked({name: lambda x, name=name, fn=fn: observe(name, fn, x) for name, fn in hooks.items()}):
            with torch.no_grad():
                for group in _groups(len(self.store), self.batch):
                    seen.clear()
                    try:
                        self.block(torch.cat([self.store.get(i) for i in group]), self.cos, self.sin, None)
                    except _PassDone:
                        pass

    def advance(self, hooks: dict[str, Callable[[torch.Tensor], None]] | None = None) -> None:
        with self._hooked(hooks or {}):
            _run_block(self.block, self.store, self.cos, self.sin, self.batch)
        self.advanced = True

    @contextmanager
    def _hooked(self, hooks: dict[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
        handles = [self.block.get_submodule(name).register_forward_pre_hook(
            lambda module, args, fn=fn: fn(args[0].detach())) for name, fn in hooks.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class StreamedRunner:
    """A :class:`ModelSource` run part by part on ``device``; see the module docstring."""

    def __init__(self, source: ModelSource, device: torch.device | str = "cpu", *,
                 progress: Progress = iter, host_budget: int = HOST_HIDDEN_BYTES, batch: int = 1):
        if batch < 1:
            raise CpmkitError(f"--batch {batch}: must be at least 1")
        self.source = source
        self.device = torch.device(device)
        self.progress = progress
        self.host_budget = host_budget
        self.batch = batch

    def logits(self, tokens: torch.Tensor, positions: slice = slice(None)) -> Iterator[torch.Tensor]:
        """float32 logits ``[1, len(positions), V]`` of each sequence of ``tokens`` [n, T], in order, at the
        positions asked for (default all)."""
        model, store, cos, sin = self._embedded(tokens)
        try:
            parts = model.parts()
            for name, names in self.progress(parts[1:-1]):
                block = self._load(model, names)
                _run_block(model.model.layers[int(name.split(".")[1])], store, cos, sin, self.batch)
                model.unload(block)
                _return_freed_memory()
            head = self._load(model, parts[-1][1])
            with torch.no_grad():
                for i in range(len(store)):
                    yield model.head(store.get(i)[:, positions], exact=True)
            model.unload(head)
        finally:
            store.close()

    def calibrate(self, tokens: torch.Tensor, visitor: BlockVisitor) -> None:
        """Run ``tokens`` [n, T] through every block, handing each to ``visitor`` first."""
        model, store, cos, sin = self._embedded(tokens)
        try:
            for name, names in self.progress(model.parts()[1:-1]):
                index = int(name.split(".")[1])
                block_names = self._load(model, names)
                block = model.model.layers[index]
                run = BlockPass(block, store, cos, sin, self.batch)
                visitor.visit(index, block, run)
                if not run.advanced:
                    run.advance()
                model.unload(block_names)
                _return_freed_memory()
        finally:
            store.close()

    def _embedded(self, tokens: torch.Tensor) -> tuple[CausalLM, HiddenStore, torch.Tensor, torch.Tensor]:
        """A fresh skeleton, and every sequence's embedding in a store."""
        model = self.source.build()
        n, length = tokens.shape
        store = HiddenStore(n, (1, length, model.spec.hidden_size), model.dtype, self.device,
                            host_budget=self.host_budget)
        embedding = self._load(model, model.parts()[0][1])
        with torch.no_grad():
            for i in range(n):
                store.put(i, model.embed(tokens[i : i + 1].to(self.device)))
        model.unload(embedding)
        _return_freed_memory()
        cos, sin = model.rope(0, length, self.device)
        return model, store, cos, sin

    def _load(self, model: CausalLM, names: list[str]) -> list[str]:
        """Fill ``names`` from the source onto the device; quantized linears of a small block keep their
        dequantized weights for the pass. Returns the names, for ``unload``."""
        load_part(self.source, model, names, self.device)
        prefixes = {n.rpartition(".")[0] for n in names}
        quantized = [m for p in prefixes for m in [model.get_submodule(p)] if hasattr(m, "cache_dequantized")]
        dense = sum(m.in_features * m.out_features * 4 for m in quantized)
        for m in quantized:
            m.cache_dequantized = self.device.type == "cpu" and dense <= CACHE_BLOCK_BYTES
        return names


def _return_freed_memory() -> None:
    """Hand the heap memory a finished part freed back to the system (glibc keeps freed blocks below its
    adaptive mmap threshold, up to 32 MiB each, and several threads' arenas of them, so the process would
    otherwise grow with every part)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def load_part(source: ModelSource, model: CausalLM, names: list[str], device: torch.device) -> None:
    """Fill the tensors ``names`` of ``model`` (a skeleton of ``source``) from the source, on ``device``."""
    model.load_weights(((n, t.to(device)) for n, t in source.read(names)), names=names)


def loaded_parts(source: ModelSource, device: torch.device) -> Iterator[tuple[CausalLM, str]]:
    """(model, part name) with one part at a time loaded on ``device``, emptied again after the caller's turn."""
    model = source.build()
    for name, names in model.parts():
        load_part(source, model, names, device)
        yield model, name
        model.unload(names)


def _groups(n: int, batch: int) -> Iterator[range]:
    for start in range(0, n, batch):
        yield range(start, min(start + batch, n))


def _run_block(block: nn.Module, store: HiddenStore, cos: torch.Tensor, sin: torch.Tensor, batch: int) -> None:
    """Run the block over every sequence, ``batch`` per forward; its outputs replace the stored hidden states."""
    with torch.no_grad():
        for group in _groups(len(store), batch):
            out = block(torch.cat([store.get(i) for i in group]), cos, sin, None)
            for row, i in enumerate(group):
                store.put(i, out[row : row + 1])
