"""Checkpoint in, GPTQ folder out: calibrated with the layer-streamed runner, written block by block as each is
quantized, so only one block's weights (and the largest stage's Hessians) are ever in memory.

The folder is what every GPTQ runtime loads (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §1):

* ``layout="gptq"``: per quantized linear ``qweight``/``qzeros``/``scales`` (float16)/``g_idx`` packed as
  AutoGPTQ packs them; symmetric weights as ``checkpoint_format: gptq`` (v1, zeros stored minus 1),
  asymmetric ones always as ``gptq_v2``; ``quantization_config`` in config.json and quantize_config.json;
* ``layout="compressed-tensors"``: ``weight_packed``/``weight_scale`` (the checkpoint's float dtype)/
  ``weight_shape`` (and ``weight_zero_point`` when asymmetric) as llm-compressor writes them.

Everything else (embedding, norms, lm_head, the MoE router) keeps the checkpoint's dtype and bytes. Weights go
to ``model.safetensors`` (sharded above 5 GiB with an index); the tokenizer, generation config and any
modeling code files of the source travel along; ``quant_log.json`` records every linear's loss, damping,
time and calibration tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import torch

from cpmkit import __version__
from cpmkit.atomic import atomic_dir
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gptq.calibrate import GPTQBlocks, calibration_tokens
from cpmkit.formats import hf_folder as hf
from cpmkit.formats.gptq.config import (
    QUANTIZE_CONFIG,
    compressed_tensors_config,
    gptq_quantization_config,
)
from cpmkit.formats.gptq.pack import pack_qweight, pack_qzeros, pack_rows
from cpmkit.formats.safetensors import ShardedWriter, TensorSlot
from cpmkit.models.reference import checkpoint_source
from cpmkit.models.stages import quantization_stages
from cpmkit.models.streamed import StreamedRunner
from cpmkit.quant.gptq import GPTQSpec
from cpmkit.quant.groups import GroupQuantized

LOG_NAME = "quant_log.json"
METADATA = {"format": "pt"}
LAYOUTS = ("gptq", "compressed-tensors")
DROPPED_CONFIG_KEYS = ("quantization_config", "compression_config")


def quantized_tensors(ck: Checkpoint) -> dict[str, str]:
    """Checkpoint weight name -> its linear's name relative to the block, for every linear GPTQ quantizes."""
    stages = quantization_stages(ck.spec)
    return {f"model.layers.{i}.{name}.weight": name for i in range(ck.spec.num_layers)
            for stage in stages for name in stage}


def _slots(name: str, shape: tuple[int, ...], spec: GPTQSpec, layout: str, scale_dtype: torch.dtype) -> list[TensorSlot]:
    n, k = shape
    g, bits = spec.group, spec.group.bits
    groups = k // g.group(k)
    module = name.removesuffix(".weight")
    if layout == "gptq":
        return [TensorSlot(f"{module}.qweight", torch.int32, (k * bits // 32, n), n * k),
                TensorSlot(f"{module}.qzeros", torch.int32, (groups, n * bits // 32), 0),
                TensorSlot(f"{module}.scales", torch.float16, (groups, n), 0),
                TensorSlot(f"{module}.g_idx", torch.int32, (k,), 0)]
    slots = [TensorSlot(f"{module}.weight_packed", torch.int32, (n, k * bits // 32), n * k),
             TensorSlot(f"{module}.weight_scale", scale_dtype, (n, groups), 0)]
    if not g.sym:
        slots.append(TensorSlot(f"{module}.weight_zero_point", torch.int32, (n * bits // 32, groups), 0))
    return slots + [TensorSlot(f"{module}.weight_shape", torch.int64, (2,), 0)]


def _packed(q: GroupQuantized, layout: str) -> list[torch.Tensor]:
    """The tensors of one quantized linear, in ``_slots`` order."""
    bits = q.spec.bits
    if layout == "gptq":
        return [pack_qweight(q.codes, bits), pack_qzeros(q.zeros, bits, v1=q.spec.sym),
                q.scales.T.contiguous().to(torch.float16), q.g_idx.to(torch.int32)]
    tensors = [pack_qweight(q.codes, bits).T.contiguous(), q.scales.contiguous()]
    if not q.spec.sym:
        tensors.append(pack_rows(q.zeros.contiguous(), bits))
    return tensors + [torch.tensor(list(q.codes.shape), dtype=torch.int64)]


def convert_to_gptq(ck: Checkpoint, out: Path, *, spec: GPTQSpec, layout: str, calib: str | None, nsamples: int,
                    seqlen: int, device: str = "cpu", overwrite: bool = False,
                    progress: Callable[[Iterable], Iterable] = iter,
                    log: Callable[[str], None] = lambda line: None) -> Path:
    """Calibrate ``ck`` on ``nsamples`` x ``seqlen`` tokens of ``calib`` (None: the built-in text), quantize
    every block linear with GPTQ ``spec``, and write the folder ``out`` in ``layout``."""
    quantized = quantized_tensors(ck)
    for name in quantized:
        spec.group.check(ck.tensors[name].shape, name)
    tokens = calibration_tokens(ck, calib, nsamples, seqlen)
    scale_dtype = torch.float16 if layout == "gptq" else ck.tensors["model.embed_tokens.weight"].dtype
    spec = dataclasses.replace(spec, group=dataclasses.replace(spec.group, scale_dtype=scale_dtype))
    slots = [slot for name, ref in ck.tensors.items() for slot in
             (_slots(name, ref.shape, spec, layout, scale_dtype) if name in quantized
              else [TensorSlot(name, ref.dtype, ref.shape, math.prod(ref.shape))])]
    order = list(ck.tensors)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with ShardedWriter(tmp, slots, METADATA) as writer:
            written = 0

            def copy_until(stop: int) -> None:
                nonlocal written
                for name, tensor in ck.stream(order[written:stop]):
                    writer.write(name, tensor)
                written = stop

            def on_block(index: int, results: dict[str, GroupQuantized]) -> None:
                nonlocal written
                prefix = f"model.layers.{index}."
                layer = [n for n in order if n.startswith(prefix)]
                copy_until(order.index(layer[0]))
                for name in layer:
                    if name in quantized:
                        slot_names = [s.name for s in _slots(name, ck.tensors[name].shape, spec, layout, scale_dtype)]
                        for slot, tensor in zip(slot_names, _packed(results[quantized[name]], layout)):
                            writer.write(slot, tensor)
                    else:
                        writer.write(*next(ck.stream([name])))
                written = order.index(layer[-1]) + 1

            blocks = GPTQBlocks(spec, quantization_stages(ck.spec), on_block, log)
            runner = StreamedRunner(checkpoint_source(ck), device, progress=progress)
            runner.calibrate(tokens, blocks)
            copy_until(len(order))
        _write_config(ck, tmp, spec, layout)
        hf.copy_source_files(ck.root, tmp)
        hf.copy_modeling_files(ck.root, tmp)
        log_data = {"quantizer": f"cpmkit {__version__}", "calibration": {"samples": nsamples, "seqlen": seqlen,
                                                                          "text": str(calib or "builtin")},
                    "layers": [entry.as_json() for entry in blocks.layers]}
        (tmp / LOG_NAME).write_text(json.dumps(log_data, indent=2) + "\n")
    return out


def _write_config(ck: Checkpoint, folder: Path, spec: GPTQSpec, layout: str) -> None:
    g = spec.group
    if layout == "gptq":
        quantization = gptq_quantization_config(bits=g.bits, group_size=g.group_size, sym=g.sym,
                                                desc_act=spec.act_order and not spec.static_groups,
                                                static_groups=spec.static_groups, damp=spec.damp,
                                                quantizer=f"cpmkit:{__version__}")
        (folder / QUANTIZE_CONFIG).write_text(json.dumps(quantization, indent=2) + "\n")
    else:
        quantization = compressed_tensors_config(bits=g.bits, group_size=g.group_size, sym=g.sym, ignore=["lm_head"])
    config = {k: v for k, v in ck.config.items() if k not in DROPPED_CONFIG_KEYS}
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
