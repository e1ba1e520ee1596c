"""A Hugging Face folder of block-quantized linears (GPTQ, AWQ, compressed-tensors), written block by block as a
quantizer finishes each: every other tensor is copied from the checkpoint in order, so the file is written
front to back and only the block being quantized is in memory.

A :class:`TensorLayout` says which tensors stand for one quantized linear and how a
:class:`~cpmkit.quant.groups.GroupQuantized` becomes them (the byte layouts themselves are in
``cpmkit.formats``). A quantizer calls ``on_block(index, quantized, changed)`` once per block: ``quantized``
holds the block's quantized linears, ``changed`` any other block tensor it modified (AWQ's scaled norms), both
by names relative to the block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Protocol

import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.errors import CpmkitError
from cpmkit.formats import awq
from cpmkit.formats.gptq.pack import pack_qweight, pack_qzeros, pack_rows
from cpmkit.formats.safetensors import ShardedWriter, TensorSlot
from cpmkit.models.stages import quantized_linears
from cpmkit.quant.groups import GroupQuantized

OnBlock = Callable[[int, dict[str, GroupQuantized], dict[str, torch.Tensor]], None]
LOG_NAME = "quant_log.json"  # cpmkit's record of how the folder was quantized (method, calibration, per-layer)


def read_log(folder: Path) -> dict:
    """cpmkit's log in ``folder`` ({} when there is none, or it is not a JSON object)."""
    try:
        log = json.loads((folder / LOG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return log if isinstance(log, dict) else {}


def logged_method(folder: Path) -> str | None:
    """The ``method`` cpmkit's log in ``folder`` records (gptq, rtn, awq), or None without one."""
    method = read_log(folder).get("method")
    return method if isinstance(method, str) else None


def stored_linear_shape(folder: Path, spec, module: str, stored_as: str = "quantized") -> tuple[int, int]:
    """(N, K) of the model's linear ``module`` that the folder stores ``stored_as``; one CpmkitError line when the
    model has no such linear."""
    shape = spec.tensor_shapes().get(f"{module}.weight")
    if shape is None or len(shape) != 2:
        raise CpmkitError(f"{folder}: {module} is stored {stored_as} but this {spec.architecture} model has no such "
                          "linear")
    return int(shape[0]), int(shape[1])


def weight_dtype_of(tensors: dict, scale_suffixes: tuple[str, ...] = ()) -> torch.dtype:
    """The float dtype of a folder's unquantized tensors (those not ending in ``scale_suffixes``), float32 when
    they mix dtypes."""
    floats = {t.dtype for name, t in tensors.items()
              if t.dtype.is_floating_point and not (scale_suffixes and name.endswith(scale_suffixes))}
    return floats.pop() if len(floats) == 1 else torch.float32


class TensorLayout(Protocol):
    def slots(self, module: str, n: int, k: int) -> list[TensorSlot]: ...

    def tensors(self, q: GroupQuantized) -> list[torch.Tensor]: ...


class GPTQLayout:
    """AutoGPTQ's qweight/qzeros/scales/g_idx; symmetric zeros stored minus 1 (checkpoint_format gptq)."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def slots(self, module: str, n: int, k: int) -> list[TensorSlot]:
        groups = 1 if self.group_size == -1 else k // self.group_size
        return [TensorSlot(f"{module}.qweight", torch.int32, (k * self.bits // 32, n), n * k),
                TensorSlot(f"{module}.qzeros", torch.int32, (groups, n * self.bits // 32), 0),
                TensorSlot(f"{module}.scales", torch.float16, (groups, n), 0),
                TensorSlot(f"{module}.g_idx", torch.int32, (k,), 0)]

    def tensors(self, q: GroupQuantized) -> list[torch.Tensor]:
        bits = q.spec.bits
        return [pack_qweight(q.codes, bits), pack_qzeros(q.zeros, bits, v1=q.spec.sym),
                q.scales.T.contiguous().to(torch.float16), q.g_idx.to(torch.int32)]


class CompressedTensorsLayout:
    """llm-compressor's pack-quantized: weight_packed, weight_scale (``scale_dtype``), weight_zero_point when
    asymmetric, weight_shape."""

    def __init__(self, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype):
        self.bits, self.group_size, self.sym, self.scale_dtype = bits, group_size, sym, scale_dtype

    def slots(self, module: str, n: int, k: int) -> list[TensorSlot]:
        groups = 1 if self.group_size == -1 else k // self.group_size
        slots = [TensorSlot(f"{module}.weight_packed", torch.int32, (n, k * self.bits // 32), n * k),
                 TensorSlot(f"{module}.weight_scale", self.scale_dtype, (n, groups), 0)]
        if not self.sym:
            slots.append(TensorSlot(f"{module}.weight_zero_point", torch.int32, (n * self.bits // 32, groups), 0))
        return slots + [TensorSlot(f"{module}.weight_shape", torch.int64, (2,), 0)]

    def tensors(self, q: GroupQuantized) -> list[torch.Tensor]:
        tensors = [pack_qweight(q.codes, self.bits).T.contiguous(), q.scales.to(self.scale_dtype).contiguous()]
        if not self.sym:
            tensors.append(pack_rows(q.zeros.contiguous(), self.bits))
        return tensors + [torch.tensor(list(q.codes.shape), dtype=torch.int64)]


class AWQGemmLayout:
    def __init__(self, group_size: int):
        self.group_size = group_size

    def slots(self, module: str, n: int, k: int) -> list[TensorSlot]:
        groups = k // self.group_size
        return [TensorSlot(f"{module}.qweight", torch.int32, (k, n // 8), n * k),
                TensorSlot(f"{module}.qzeros", torch.int32, (groups, n // 8), 0),
                TensorSlot(f"{module}.scales", torch.float16, (groups, n), 0)]

    def tensors(self, q: GroupQuantized) -> list[torch.Tensor]:
        qweight, qzeros = awq.pack_gemm(q.codes, q.zeros)
        return [qweight, qzeros, q.scales.T.contiguous().to(torch.float16)]


class AWQGemvLayout:
    def __init__(self, group_size: int):
        self.group_size = group_size

    def slots(self, module: str, n: int, k: int) -> list[TensorSlot]:
        width = awq.gemv_zeros_width(k, self.group_size)
        return [TensorSlot(f"{module}.qweight", torch.int32, (n, k // 8), n * k),
                TensorSlot(f"{module}.qzeros", torch.int32, (n, width), 0),
                TensorSlot(f"{module}.scales", torch.float16, (n, 8 * width), 0)]

    def tensors(self, q: GroupQuantized) -> list[torch.Tensor]:
        return list(awq.pack_gemv(q.codes, q.zeros, q.scales, self.group_size))


def quantized_tensors(ck: Checkpoint) -> dict[str, str]:
    """Checkpoint weight name -> its linear's name relative to the block, for every linear that is quantized."""
    return {f"model.layers.{i}.{name}.weight": name for i in range(ck.spec.num_layers)
            for name in quantized_linears(ck.spec)}


def write_blocks(ck: Checkpoint, folder: Path, layout: TensorLayout, metadata: dict[str, str],
                 quantize: Callable[[OnBlock], None]) -> None:
    """Write ``folder``'s weights: ``quantize(on_block)`` runs the quantizer, which hands over each block."""
    quantized = quantized_tensors(ck)
    slots = [slot for name, ref in ck.tensors.items() for slot in
             (layout.slots(name.removesuffix(".weight"), *ref.shape) if name in quantized
              else [TensorSlot(name, ref.dtype, ref.shape, math.prod(ref.shape))])]
    order = list(ck.tensors)
    with ShardedWriter(folder, slots, metadata) as writer:
        written = 0

        def copy_until(stop: int) -> None:
            nonlocal written
            for name, tensor in ck.stream(order[written:stop]):
                writer.write(name, tensor)
            written = stop

        def on_block(index: int, results: dict[str, GroupQuantized], changed: dict[str, torch.Tensor]) -> None:
            nonlocal written
            prefix = f"model.layers.{index}."
            layer = [n for n in order if n.startswith(prefix)]
            copy_until(order.index(layer[0]))
            for name in layer:
                local = name.removeprefix(prefix)
                if name in quantized:
                    module = name.removesuffix(".weight")
                    slots = layout.slots(module, *ck.tensors[name].shape)
                    for slot, tensor in zip(slots, layout.tensors(results[quantized[name]])):
                        writer.write(slot.name, tensor)
                elif local in changed:
                    writer.write(name, changed[local].to(ck.tensors[name].dtype))
                else:
                    writer.write(*next(ck.stream([name])))
            written = order.index(layer[-1]) + 1

        quantize(on_block)
        copy_until(len(order))


def check_tensor_names(folder: Path, names: list[str], tensors: dict) -> None:
    """Every tensor the model has is stored, and nothing else (a tied head may be stored or not)."""
    extra = sorted(set(tensors) - set(names) - {"lm_head.weight"})
    if extra:
        raise CpmkitError(f"{folder}: tensor {extra[0]} has no place in this model ({len(extra)} such tensors)")
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CpmkitError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing in all)")


def stored_linear_factory(folder: Path, formats: dict, tensors: dict, plain: Callable, **options) -> Callable:
    """The model's linear factory for a folder of stored quantized linears: a ``QuantLinear`` of ``formats[name]``
    over meta placeholders of its stored tensors (``options``: QuantLinear's), ``plain(...)`` for every other
    linear; a missing or misshapen tensor is one CpmkitError line naming the folder."""
    from cpmkit.kernels import QuantLinear

    def linear(name: str, in_features: int, out_features: int):
        if name not in formats:
            return plain(name, in_features, out_features)
        fmt = formats[name]
        missing = [b for b in fmt.buffer_names if f"{name}.{b}" not in tensors]
        if missing:
            raise CpmkitError(f"{folder}: {name}.{missing[0]} is missing")
        placeholders = {b: torch.empty(tensors[f"{name}.{b}"].shape, dtype=tensors[f"{name}.{b}"].dtype, device="meta")
                        for b in fmt.buffer_names}
        try:
            return QuantLinear(fmt, placeholders, name=name, **options)
        except CpmkitError as e:
            raise CpmkitError(f"{folder}: {e}") from None

    return linear


def stored_model_source(folder: Path, spec, tensors: dict, formats: dict, *, dtype: torch.dtype, backend,
                        cache_dequantized: bool, scale_suffixes: tuple[str, ...] = (),
                        check: Callable[[str, torch.Tensor], None] = lambda name, tensor: None):
    """A folder of stored quantized linears (``formats``: module name -> its kernel weight type) as a lazily read
    ``ModelSource``; the float tensors other than those ending in ``scale_suffixes`` give the model's dtype, and
    ``check(name, tensor)`` sees every tensor as it is read."""
    from cpmkit.models import build_model
    from cpmkit.models.causal_lm import default_linear_factory
    from cpmkit.models.source import ModelSource

    weight_dtype = weight_dtype_of(tensors, scale_suffixes)
    linear = stored_linear_factory(folder, formats, tensors, default_linear_factory(weight_dtype), backend=backend,
                                   cache_dequantized=cache_dequantized)

    def build():
        return build_model(spec, linear_factory=linear, dtype=dtype, weight_dtype=weight_dtype)

    check_tensor_names(folder, build().tensor_names(), tensors)

    def read(names):
        for name in names:
            tensor = tensors[name].read()
            check(name, tensor)
            yield name, tensor

    return ModelSource(spec, build, read)
