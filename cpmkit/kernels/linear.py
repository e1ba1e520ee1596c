"""``QuantLinear``: a drop-in for ``nn.Linear`` that holds a quantized artifact's weight as stored.

One module class for every format; a small frozen weight-format object from the format's plug-in
(:class:`WeightFormat`, e.g. ``cpmkit.convert.gguf.weight.GGUFWeight``) knows the buffer names, how the
format's own reader dequantizes them, and how to repack them for the kernels. The buffers are the artifact's tensors unchanged (so the
state_dict is the file's bytes), and forward runs one of:

* Triton (``Backend.TRITON``, and ``Backend.AUTO`` on CUDA): the buffers are repacked once per device
  into :class:`~cpmkit.kernels.layout.PackedWeight` (kept beside them: about twice the weight's bytes
  on the GPU) and multiplied by the dequant-GEMM kernels; on CPU this needs ``TRITON_INTERPRET=1``
  (the tests).
* torch (``Backend.TORCH``, and ``Backend.AUTO`` elsewhere): dequantize with the format owners' code
  (``cpmkit.formats.gguf.blocks.dequantize``; ``cpmkit.formats.mlx.pack.unpack_codes`` with
  ``cpmkit.quant.affine``) and multiply in float32. ``cache_dequantized=True`` keeps the float32 weight
  (4 bytes per weight) for repeated CPU forwards such as a perplexity run.

The Triton modules are imported on first use: triton exists on Linux only, and the fallback must work
without it.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Callable, Protocol

import torch
from torch import nn

from cpmkit.errors import CpmkitError
from cpmkit.kernels.layout import PackedWeight, concat_outputs

DEQUANT_CHUNK_ELEMENTS = 1 << 22  # weights dequantized at once by the uncached torch path


def linear_by_rows(x: torch.Tensor, out_features: int, rows: Callable[[int, int], torch.Tensor],
                   step: int) -> torch.Tensor:
    """``x [..., K] @ W.T`` where ``rows(start, stop)`` gives W's rows ``[start, stop)`` in x's dtype, ``step``
    rows at a time, each product written into one preallocated output (kept transposed, so a block of rows is
    contiguous). Collecting partial outputs in a list instead would leave each beside a freed weight block and
    fragment the heap by the whole weight's size."""
    x2d = x.reshape(-1, x.shape[-1])
    out = torch.empty(out_features, x2d.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        torch.mm(rows(start, stop), x2d.T, out=out[start:stop])
    return out.T.reshape(*x.shape[:-1], out_features)


class Backend(str, Enum):
    AUTO = "auto"  # Triton for CUDA inputs, torch otherwise
    TRITON = "triton"  # always Triton (CPU inputs only under TRITON_INTERPRET=1)
    TORCH = "torch"  # dequantize with the format's reader, then a float32 matmul


class WeightFormat(Protocol):
    """What a format plug-in's weight type provides (``cpmkit.convert.gguf.weight.GGUFWeight`` is one):
    the names of the buffers it keeps, a check of their shapes and dtypes, its own reader's dequantization
    to float32 ``[N, K]``, the repack into the kernel layout, and labels for tables and ``repr``."""

    shape: tuple[int, int]  # (N, K)
    buffer_names: tuple[str, ...]

    @property
    def label(self) -> str: ...

    def check(self, *buffers_and_name) -> None: ...

    def dequantize(self, *buffers: torch.Tensor) -> torch.Tensor: ...

    def dequantize_rows(self, *buffers_then_range) -> torch.Tensor:
        """(*buffers, start, stop) -> float32 rows ``[stop - start, K]`` of the weight."""

    def pack(self, *buffers_and_name) -> PackedWeight: ...

    def describe(self) -> str: ...


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W [out_features, in_features]`` held quantized.

    ``tune`` (a ``cpmkit.kernels.dispatch.TuneCache``) may be assigned to use autotuned tiles on GPU.
    """

    def __init__(self, fmt: WeightFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 backend: Backend = Backend.AUTO, cache_dequantized: bool = False, name: str = "weight"):
        super().__init__()
        fmt.check(*(tensors[b] for b in fmt.buffer_names), name)
        self.fmt = fmt
        self.name = name
        self.out_features, self.in_features = fmt.shape
        self.backend = Backend(backend)
        self.cache_dequantized = cache_dequantized
        self._tune = None
        self._plans: dict = {}  # (rows, dtype) -> the dispatcher's (strategy, config), for this packed weight
        for b in fmt.buffer_names:
            self.register_buffer(b, tensors[b])
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise CpmkitError(f"{name}: bias of shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # derived from the buffers, each with the _source_key() it was built from
        self._packed: tuple[tuple, PackedWeight] | None = None
        self._dequantized: tuple[tuple, torch.Tensor] | None = None
        # this linear's weights beside those of linears on the same input (fused_forward), by partners, and their
        # plans
        self._fused: dict[tuple[int, ...], tuple[tuple, PackedWeight | None]] = {}
        self._fused_plans: dict[tuple[int, ...], dict] = {}

    @property
    def tune(self):
        return self._tune

    @tune.setter
    def tune(self, cache) -> None:
        self._tune = cache
        self._plans, self._fused_plans = {}, {}

    def _source(self) -> list[torch.Tensor]:
        return [getattr(self, b) for b in self.fmt.buffer_names]

    def _source_key(self) -> tuple:
        # buffers get replaced (a loader assigning into meta placeholders) or overwritten in place
        # (load_state_dict); either makes the packed and dequantized copies stale
        return tuple((t.device, t.data_ptr(), t._version) for t in self._source())

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 ``[out_features, in_features]``, decoded by the format's own reader."""
        return self.fmt.dequantize(*self._source())

    def packed(self) -> PackedWeight:
        """The kernel layout on the buffers' device, repacked when the buffers have changed."""
        key = self._source_key()
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, self.fmt.pack(*self._source(), self.name))
            self._plans = {}
        return self._packed[1]

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == Backend.TORCH:
            return False
        if x.is_cuda:
            return True
        if self.backend == Backend.TRITON:
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise CpmkitError(f"{self.name}: the Triton path on CPU needs TRITON_INTERPRET=1 in the environment "
                                  "before triton is imported; use Backend.TORCH or a CUDA device")
            return True
        return False

    def clear_cache(self) -> None:
        """Drop the repacked and dequantized copies (the buffers themselves stay)."""
        self._packed = self._dequantized = None
        self._plans, self._fused, self._fused_plans = {}, {}, {}

    def fused_with(self, others: tuple[QuantLinear, ...]) -> tuple[PackedWeight | None, dict]:
        """(This linear's kernel weight side by side with ``others``', None when their layouts differ; the plans
        for it), built once for the buffers as they are. The separate packed copies are dropped once joined; a
        linear also called alone packs its own again (both copies then stay until ``clear_cache``)."""
        partners = tuple(id(m) for m in others)
        key = tuple(m._source_key() for m in (self, *others))
        have = self._fused.get(partners)
        if have is None or have[0] != key:
            joined = concat_outputs([m.packed() for m in (self, *others)])
            if joined is not None:
                for m in (self, *others):
                    m._packed = None
            have = self._fused[partners] = (key, joined)
            self._fused_plans[partners] = {}
        return have[1], self._fused_plans[partners]

    def _torch_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in float32: with ``cache_dequantized``, over the kept float32 weight; otherwise a row
        chunk of W at a time, so the float32 copy never exceeds ``DEQUANT_CHUNK_ELEMENTS``."""
        x32 = x.float()
        if self.cache_dequantized:
            key = (*self._source_key(), x.device)
            if self._dequantized is None or self._dequantized[0] != key:
                self._dequantized = (key, self.dequantize().to(x.device))
            return x32 @ self._dequantized[1].T
        step = max(1, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        if step >= self.out_features:
            return x32 @ self.dequantize().to(x.device).T
        source = self._source()
        return linear_by_rows(x32, self.out_features,
                              lambda start, stop: self.fmt.dequantize_rows(*source, start, stop).to(x.device), step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise CpmkitError(f"{self.name}: input of shape {tuple(x.shape)} does not end in in_features "
                              f"{self.in_features}")
        if self._use_triton(x):
            from cpmkit.kernels.dispatch import quant_matmul

            y = quant_matmul(x, self.packed(), self.tune, self._plans)
        else:
            y = self._torch_matmul(x).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt.describe()}, "
                f"bias={self.bias is not None}, backend={self.backend.value}")


def fused_forward(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """``[linear(x) for linear in linears]`` for linears that read the same input (q/k/v, gate/up): one kernel
    launch over their weights side by side when all are QuantLinears on the Triton path with one layout and no
    hooks (calibration and tracing see each module called), each in turn otherwise."""
    first = linears[0]
    if not all(isinstance(m, QuantLinear) and m._use_triton(x) and not (m._forward_hooks or m._forward_pre_hooks)
               and m.in_features == first.in_features for m in linears):
        return [m(x) for m in linears]
    joined, plans = first.fused_with(linears[1:])
    if joined is None or x.shape[-1] != first.in_features:
        return [m(x) for m in linears]
    from cpmkit.kernels.dispatch import quant_matmul

    outs = quant_matmul(x, joined, first.tune, plans).split([m.out_features for m in linears], dim=-1)
    return [y if m.bias is None else y + m.bias.to(y.dtype) for y, m in zip(outs, linears)]
