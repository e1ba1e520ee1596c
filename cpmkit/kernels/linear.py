"""``QuantLinear``: a drop-in for ``nn.Linear`` that holds a quantized artifact's weight as stored.

One module class for every format; a small frozen format object (:class:`GGUFWeight`,
:class:`MLXAffineWeight`) knows the buffer names, how the format's own reader dequantizes them, and
how to repack them for the kernels. The buffers are the artifact's tensors unchanged (so the
state_dict is the file's bytes), and forward runs one of:

* Triton (``Backend.TRITON``, and ``Backend.AUTO`` on CUDA): the buffers are repacked once per device
  into :class:`~cpmkit.kernels.layout.PackedWeight` (kept beside them: about twice the weight's bytes
  on the GPU) and multiplied by the dequant-GEMM kernels; on CPU this needs ``TRITON_INTERPRET=1``
  (the tests).
* torch (``Backend.TORCH``, and ``Backend.AUTO`` elsewhere): dequantize with the format owners' code
  (``cpmkit.formats.gguf.blocks.dequantize``; ``cpmkit.formats.mlx_pack.unpack_codes`` with
  ``cpmkit.quant.affine``) and multiply in float32. ``cache_dequantized=True`` keeps the float32 weight
  (4 bytes per weight) for repeated CPU forwards such as a perplexity run.

The Triton modules are imported on first use: triton exists on Linux only, and the fallback must work
without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.layout import BLOCKS
from cpmkit.kernels.layout import PackedWeight
from cpmkit.kernels.repack import gguf_kernel_type, mlx_layout, pack_gguf, pack_mlx


class Backend(str, Enum):
    AUTO = "auto"  # Triton for CUDA inputs, torch otherwise
    TRITON = "triton"  # always Triton (CPU inputs only under TRITON_INTERPRET=1)
    TORCH = "torch"  # dequantize with the format's reader, then a float32 matmul


@dataclass(frozen=True)
class GGUFWeight:
    """A GGUF tensor: buffer ``raw`` uint8 ``[N, K / block_size * type_size]``, blocks along K."""

    qtype: QType
    shape: tuple[int, int]  # (N, K)
    buffer_names = ("raw",)

    def check(self, raw: torch.Tensor, name: str) -> None:
        gguf_kernel_type(self.qtype)  # raises for types without a kernel
        n, k = self.shape
        bl = BLOCKS[self.qtype]
        if k % bl.block_size or raw.dtype != torch.uint8 or tuple(raw.shape) != (n, bl.row_bytes(k)):
            raise CpmkitError(f"{name}: {self.qtype.name} data {raw.dtype} {tuple(raw.shape)} does not hold an "
                              f"{n}x{k} weight; expected uint8 rows of K/{bl.block_size} blocks of "
                              f"{bl.type_size} bytes")

    def dequantize(self, raw: torch.Tensor) -> torch.Tensor:
        from cpmkit.formats.gguf.blocks import dequantize

        return dequantize(raw, self.qtype)

    def pack(self, raw: torch.Tensor, name: str) -> PackedWeight:
        return pack_gguf(raw, self.qtype, self.shape, name)

    def describe(self) -> str:
        return f"gguf {self.qtype.name}"


@dataclass(frozen=True)
class MLXAffineWeight:
    """An MLX affine-quantized weight: buffers ``weight`` uint32 ``[N, K*bits/32]``, ``scales`` and
    ``biases`` ``[N, K/group_size]`` (float16/bfloat16/float32); ``w = scale * q + bias``."""

    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K)
    buffer_names = ("weight", "scales", "biases")

    def check(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, name: str) -> None:
        mlx_layout(self.bits, self.group_size)  # raises for widths without a kernel
        n, k = self.shape
        if (weight.dtype not in (torch.uint32, torch.int32) or k % self.group_size
                or tuple(weight.shape) != (n, k * self.bits // 32)
                or tuple(scales.shape) != (n, k // self.group_size) or biases.shape != scales.shape):
            raise CpmkitError(f"{name}: MLX weight {weight.dtype} {tuple(weight.shape)}, scales {tuple(scales.shape)}"
                              f", biases {tuple(biases.shape)} do not fit {self.bits}-bit group-{self.group_size} "
                              f"codes of an {n}x{k} weight")

    def dequantize(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        from cpmkit.formats.mlx_pack import unpack_codes
        from cpmkit.quant.affine import AffineQuantized, AffineSpec, dequantize_affine

        codes = unpack_codes(weight, self.bits, self.shape[1])
        # float32 scales and biases: the affine product is formed in float32, as MLX's matmul kernels do
        spec = AffineSpec(bits=self.bits, group_size=self.group_size)
        return dequantize_affine(AffineQuantized(codes, scales.float(), biases.float(), spec))

    def pack(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, name: str) -> PackedWeight:
        return pack_mlx(weight, scales, biases, self.bits, self.group_size, name)

    def describe(self) -> str:
        return f"mlx affine {self.bits}-bit group {self.group_size}"


WeightFormat = GGUFWeight | MLXAffineWeight


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
        self.tune = None
        for b in fmt.buffer_names:
            self.register_buffer(b, tensors[b])
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise CpmkitError(f"{name}: bias of shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # derived from the buffers, each with the _source_key() it was built from
        self._packed: tuple[tuple, PackedWeight] | None = None
        self._dequantized: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, qtype: QType, shape: tuple[int, int], bias: torch.Tensor | None = None,
                  **options) -> QuantLinear:
        """``raw``: the tensor's bytes as stored, uint8 ``[N, row_bytes]``; ``shape``: ``(N, K)``."""
        return cls(GGUFWeight(QType(qtype), (int(shape[0]), int(shape[1]))), {"raw": raw}, bias, **options)

    @classmethod
    def from_mlx(cls, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None = None, **options) -> QuantLinear:
        shape = (weight.shape[0], weight.shape[-1] * 32 // bits)
        fmt = MLXAffineWeight(bits, group_size, shape)
        return cls(fmt, {"weight": weight, "scales": scales, "biases": biases}, bias, **options)

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

    def _weight_f32(self, device: torch.device) -> torch.Tensor:
        key = (*self._source_key(), device)
        if self._dequantized is not None and self._dequantized[0] == key:
            return self._dequantized[1]
        w = self.dequantize().to(device)
        if self.cache_dequantized:
            self._dequantized = (key, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise CpmkitError(f"{self.name}: input of shape {tuple(x.shape)} does not end in in_features "
                              f"{self.in_features}")
        if self._use_triton(x):
            from cpmkit.kernels.dispatch import quant_matmul

            y = quant_matmul(x, self.packed(), self.tune)
        else:
            y = (x.float() @ self._weight_f32(x.device).T).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt.describe()}, "
                f"bias={self.bias is not None}, backend={self.backend.value}")
