"""Checkpoint in, AWQ folder out: calibrated with the layer-streamed runner (``calibrate.AWQBlocks``), written block
by block (``cpmkit.convert.quantized_folder``) with the norms that took AWQ's inverse scales.

Layouts: ``gemm`` (AutoAWQ's WQLinear_GEMM, what vLLM's awq/awq_marlin and transformers read; the default),
``gemv`` (WQLinear_GEMV), ``compressed-tensors`` (llm-compressor's pack-quantized, asymmetric; 3-bit too).
Everything not quantized keeps the checkpoint's dtype and bytes except the scaled norms; the tokenizer,
generation config and modeling files travel along; ``quant_log.json`` records each group's chosen ratio and
losses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from cpmkit import __version__
from cpmkit.atomic import atomic_dir
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.awq.calibrate import AWQBlocks
from cpmkit.convert.gptq.calibrate import Calibration, forward_batch
from cpmkit.convert.quantized_folder import (
    LOG_NAME,
    AWQGemmLayout,
    AWQGemvLayout,
    CompressedTensorsLayout,
    OnBlock,
    quantized_tensors,
    write_blocks,
)
from cpmkit.formats import hf_folder as hf
from cpmkit.formats.awq import awq_quantization_config
from cpmkit.formats.gptq.config import compressed_tensors_config
from cpmkit.models.reference import checkpoint_source
from cpmkit.models.stages import awq_groups, quantized_linears
from cpmkit.models.streamed import StreamedRunner
from cpmkit.quant.awq import AWQSpec

LAYOUTS = ("gemm", "gemv", "compressed-tensors")


def convert_to_awq(ck: Checkpoint, out: Path, *, spec: AWQSpec, layout: str, calibration: Calibration,
                   device: str = "cpu", overwrite: bool = False, progress: Callable[[Iterable], Iterable] = iter,
                   log: Callable[[str], None] = lambda line: None) -> Path:
    """AWQ every block linear of ``ck`` (``spec``), calibrated on ``calibration``; write ``out`` in ``layout``."""
    for name in quantized_tensors(ck):
        spec.group.check(ck.tensors[name].shape, name)
    g = spec.group
    scale_dtype = ck.tensors["model.embed_tokens.weight"].dtype if layout == "compressed-tensors" else torch.float16
    spec = dataclasses.replace(spec, group=dataclasses.replace(g, scale_dtype=scale_dtype))
    tensor_layout = {"gemm": lambda: AWQGemmLayout(g.group_size), "gemv": lambda: AWQGemvLayout(g.group_size),
                     "compressed-tensors": lambda: CompressedTensorsLayout(g.bits, g.group_size, False, scale_dtype)
                     }[layout]()
    tokens = calibration.tokens(ck)
    blocks: list[AWQBlocks] = []

    def quantize(on_block: OnBlock) -> None:
        visitor = AWQBlocks(spec, awq_groups(ck.spec), quantized_linears(ck.spec), on_block, log)
        blocks.append(visitor)
        runner = StreamedRunner(checkpoint_source(ck), device, progress=progress,
                                batch=forward_batch(calibration.seqlen))
        runner.calibrate(tokens, visitor)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_blocks(ck, tmp, tensor_layout, hf.SAFETENSORS_METADATA, quantize)
        if layout == "compressed-tensors":
            quantization = compressed_tensors_config(bits=g.bits, group_size=g.group_size, sym=False,
                                                     ignore=["lm_head"], actorder=None)
        else:
            quantization = awq_quantization_config(group_size=g.group_size, version=layout)
        hf.write_quantized_config(tmp, ck.config, quantization)
        hf.copy_source_files(ck.root, tmp)
        hf.copy_modeling_files(ck.root, tmp)
        log_data = {"quantizer": f"cpmkit {__version__}", "method": "awq", "clip": spec.clip,
                    "calibration": {"samples": calibration.nsamples, "seqlen": calibration.seqlen,
                                    "text": calibration.source},
                    "groups": blocks[0].layers if blocks else []}
        (tmp / LOG_NAME).write_text(json.dumps(log_data, indent=2) + "\n")
    return out
