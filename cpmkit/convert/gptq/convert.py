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
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from cpmkit import __version__
from cpmkit.atomic import atomic_dir
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gptq.calibrate import Calibration, GPTQBlocks, forward_batch
from cpmkit.convert.quantized_folder import (
    LOG_NAME,
    CompressedTensorsLayout,
    GPTQLayout,
    OnBlock,
    quantized_tensors,
    write_blocks,
)
from cpmkit.formats import hf_folder as hf
from cpmkit.formats.gptq.config import (
    QUANTIZE_CONFIG,
    compressed_tensors_config,
    gptq_quantization_config,
)
from cpmkit.models.reference import checkpoint_source
from cpmkit.models.stages import quantization_stages
from cpmkit.models.streamed import StreamedRunner
from cpmkit.quant.gptq import GPTQSpec
from cpmkit.quant.groups import round_to_nearest
from cpmkit.quant.ternary import ternary_as_groups

LAYOUTS = ("gptq", "compressed-tensors")


def convert_to_gptq(ck: Checkpoint, out: Path, *, spec: GPTQSpec, layout: str, calibration: Calibration | None,
                    exact_ternary: bool = True, device: str = "cpu", overwrite: bool = False,
                    progress: Callable[[Iterable], Iterable] = iter,
                    log: Callable[[str], None] = lambda line: None) -> Path:
    """Quantize every block linear of ``ck`` with GPTQ ``spec``, calibrated on ``calibration`` (None: round to
    nearest, no calibration), and write the folder ``out`` in ``layout``. With ``exact_ternary``, ternary linears
    (BitCPM's) are encoded exactly instead (``cpmkit.quant.ternary.ternary_as_groups``)."""
    quantized = quantized_tensors(ck)
    for name in quantized:
        spec.group.check(ck.tensors[name].shape, name)
    tokens = calibration.tokens(ck) if calibration is not None else None
    scale_dtype = torch.float16 if layout == "gptq" else ck.tensors["model.embed_tokens.weight"].dtype
    spec = dataclasses.replace(spec, group=dataclasses.replace(spec.group, scale_dtype=scale_dtype))
    if layout == "gptq":
        tensor_layout = GPTQLayout(spec.group.bits, spec.group.group_size)
    else:
        tensor_layout = CompressedTensorsLayout(spec.group.bits, spec.group.group_size, spec.group.sym, scale_dtype)
    layers: list[dict[str, object]] = []

    def quantize(on_block: OnBlock) -> None:
        if tokens is None:
            layers.extend(_round_to_nearest(ck, quantized, spec, on_block, progress, exact_ternary))
            return
        blocks = GPTQBlocks(spec, quantization_stages(ck.spec), lambda i, q: on_block(i, q, {}), log, exact_ternary)
        runner = StreamedRunner(checkpoint_source(ck), device, progress=progress,
                                batch=forward_batch(calibration.seqlen))
        runner.calibrate(tokens, blocks)
        layers.extend(entry.as_json() for entry in blocks.layers)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_blocks(ck, tmp, tensor_layout, hf.SAFETENSORS_METADATA, quantize)
        _write_config(ck, tmp, spec, layout)
        hf.copy_source_files(ck.root, tmp)
        hf.copy_modeling_files(ck.root, tmp)
        method = "rtn" if calibration is None else "gptq"
        log_data = {"quantizer": f"cpmkit {__version__}", "method": method,
                    "calibration": None if calibration is None else {
                        "samples": calibration.nsamples, "seqlen": calibration.seqlen, "text": calibration.source},
                    "layers": layers}
        (tmp / LOG_NAME).write_text(json.dumps(log_data, indent=2) + "\n")
    return out


def _round_to_nearest(ck: Checkpoint, quantized: dict[str, str], spec: GPTQSpec, on_block: OnBlock,
                      progress: Callable[[Iterable], Iterable], exact_ternary: bool) -> list[dict[str, object]]:
    """Every block's linears rounded to nearest, one block read at a time; the log's per-linear entries."""
    layers = []
    for index in progress(range(ck.spec.num_layers)):
        names = [n for n in quantized if n.startswith(f"model.layers.{index}.")]
        results = {}
        for name, weight in ck.stream(names):
            start = time.perf_counter()
            exact = ternary_as_groups(weight, spec.group) if exact_ternary else None
            results[quantized[name]] = exact if exact is not None else round_to_nearest(weight, spec.group, name)
            layers.append({"name": name.removesuffix(".weight"), "method": "rtn" if exact is None else "ternary-exact",
                           "seconds": round(time.perf_counter() - start, 3)})
        on_block(index, results, {})
    return layers


def _write_config(ck: Checkpoint, folder: Path, spec: GPTQSpec, layout: str) -> None:
    g = spec.group
    if layout == "gptq":
        quantization = gptq_quantization_config(bits=g.bits, group_size=g.group_size, sym=g.sym,
                                                desc_act=spec.act_order and not spec.static_groups,
                                                static_groups=spec.static_groups, damp=spec.damp,
                                                quantizer=f"cpmkit:{__version__}")
        (folder / QUANTIZE_CONFIG).write_text(json.dumps(quantization, indent=2) + "\n")
    else:
        quantization = compressed_tensors_config(bits=g.bits, group_size=g.group_size, sym=g.sym, ignore=["lm_head"],
                                                 actorder="static" if spec.act_order and spec.static_groups else None)
    hf.write_quantized_config(folder, ck.config, quantization)
