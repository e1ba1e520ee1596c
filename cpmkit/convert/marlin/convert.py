"""GPTQ folder (or checkpoint) in, CPM.cu Marlin folder out.

``repack_gptq`` does what CPM.cu's ``gptq2marlin.py`` does, without a GPU: it checks the GPTQ folder is
Marlin-eligible (4-bit, group 128, symmetric, no act-order permutation, lm_head not quantized), concatenates
q/k/v and gate/up along N, repacks every linear into Marlin tiles (``cpmkit.formats.marlin``), drops qzeros and
g_idx, copies norms, embedding and head unchanged, writes ``model_gptq.safetensors`` one layer at a time, and
copies config.json unchanged with the tokenizer and modeling files. ``convert_to_marlin`` first calibrates a
GPTQ folder of that kind (act-order inside static groups, so the layout stays ``k // 128``) next to the output,
then repacks it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from cpmkit.atomic import atomic_dir
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gptq.calibrate import Calibration
from cpmkit.convert.gptq.convert import convert_to_gptq
from cpmkit.convert.gptq.load import folder_tensors, model_spec
from cpmkit.convert.quantized_folder import LOG_NAME
from cpmkit.errors import CpmkitError
from cpmkit.formats import hf_folder as hf
from cpmkit.formats import marlin
from cpmkit.formats.gptq.config import CONFIG, read_gptq_config
from cpmkit.formats.gptq.pack import unpack_qzeros, unpack_rows
from cpmkit.formats.safetensors import StoredTensor, StreamingWriter
from cpmkit.quant.gptq import DEFAULT_DAMP, GPTQSpec
from cpmkit.quant.groups import GroupSpec

SYM_ZERO = 8  # a symmetric 4-bit code's zero: Marlin's uint4b8


def eligibility(folder: Path) -> str | None:
    """Why the GPTQ folder cannot be repacked for CPM.cu (None: it can), from its config alone."""
    config = read_gptq_config(folder)
    for key, value, wanted in (("quant_method", config.method, "gptq"), ("bits", config.bits, marlin.BITS),
                               ("group_size", config.group_size, marlin.GROUP_SIZE), ("sym", config.sym, True)):
        if value != wanted:
            return f"{key} is {value!r}; CPM.cu's Marlin takes {key} {wanted!r}"
    return None


def repack_gptq(folder: Path, out: Path, ck: Checkpoint | None = None, *, overwrite: bool = False,
                progress: Callable[[Iterable], Iterable] = iter) -> Path:
    """Write the CPM.cu Marlin folder ``out`` from the GPTQ folder ``folder`` (``ck``: the checkpoint it was
    made from, whose shapes it must have, and whose tokenizer files fill in any the folder lacks)."""
    folder = Path(folder)
    reason = eligibility(folder)
    if reason is not None:
        raise CpmkitError(f"{folder}: {reason}")
    spec = model_spec(folder)
    if ck is not None and spec.tensor_shapes() != ck.spec.tensor_shapes():
        raise CpmkitError(f"{folder}: its config.json describes another model than {ck.root} (tensor shapes differ)")
    config = read_gptq_config(folder)
    tensors = folder_tensors(folder)
    shapes = spec.tensor_shapes()
    linears = [n.removeprefix("model.layers.0.").removesuffix(".weight") for n, s in shapes.items()
               if n.startswith("model.layers.0.") and len(s) == 2]
    expected = set(sum(marlin.FUSED.values(), ())) | set(marlin.UNFUSED)
    if set(linears) != expected:
        raise CpmkitError(f"{folder}: CPM.cu's Marlin model has q/k/v/o/gate/up/down linears, this one "
                          f"{', '.join(sorted(linears))}")
    if "lm_head.qweight" in tensors:
        raise CpmkitError(f"{folder}: lm_head is quantized; CPM.cu's converter asserts lm_head == False")
    plan = _plan(spec, tensors, folder, config.v1)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        slots = [(n, d, s) for n, d, s, _ in plan]
        with StreamingWriter(tmp / marlin.WEIGHTS_FILE, slots, hf.SAFETENSORS_METADATA) as writer:
            for name, _, _, make in progress(plan):
                writer.write(name, make())
        shutil.copyfile(folder / CONFIG, tmp / CONFIG)  # unchanged, as gptq2marlin copies it
        for source in (folder, ck.root if ck is not None else None):
            if source is not None:
                hf.copy_source_files(source, tmp, skip_existing=True)
                hf.copy_modeling_files(source, tmp, skip_existing=True)
        if (folder / LOG_NAME).is_file():
            shutil.copyfile(folder / LOG_NAME, tmp / LOG_NAME)
    return out


def _plan(spec, tensors: dict[str, StoredTensor], folder: Path, v1: bool) -> list[tuple[str, torch.dtype, tuple, Callable]]:
    """(name, dtype, shape, make the tensor) for every tensor of the Marlin file, in file order."""
    plan = []
    layer_names = {f"model.layers.{i}.": [] for i in range(spec.num_layers)}
    for name in spec.tensor_shapes():
        layer = name[: name.index(".", len("model.layers.")) + 1] if name.startswith("model.layers.") else None
        if layer is None:
            stored = _stored(tensors, name, folder)
            plan.append((name, stored.dtype, stored.shape, stored.read))
        elif not name.endswith("_proj.weight"):
            layer_names[layer].append(name)
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        for name in layer_names[prefix]:
            stored = _stored(tensors, name, folder)
            plan.append((name, stored.dtype, stored.shape, stored.read))
        for fused, parts in [*marlin.FUSED.items(), *((u, (u,)) for u in marlin.UNFUSED)]:
            plan.extend(_linear_plan(prefix, fused, parts, tensors, folder, v1))
    return plan


def _stored(tensors: dict[str, StoredTensor], name: str, folder: Path) -> StoredTensor:
    if name not in tensors:
        raise CpmkitError(f"{folder}: tensor {name} is missing")
    return tensors[name]


def _linear_plan(prefix: str, fused: str, parts: tuple[str, ...], tensors: dict[str, StoredTensor], folder: Path,
                 v1: bool):
    """The qweight and scales entries of one Marlin linear made of the GPTQ linears ``parts``."""
    modules = [prefix + p for p in parts]
    for m in modules:
        for buffer in ("qweight", "qzeros", "scales", "g_idx"):
            _stored(tensors, f"{m}.{buffer}", folder)
    k = tensors[f"{modules[0]}.qweight"].shape[0] * 32 // marlin.BITS
    n = sum(tensors[f"{m}.qweight"].shape[1] for m in modules)
    marlin.check_shape(k, n, f"{folder}: {prefix}{fused}")
    scale_dtype = tensors[f"{modules[0]}.scales"].dtype
    name = prefix + fused
    cached: dict[str, torch.Tensor] = {}

    def tile() -> dict[str, torch.Tensor]:
        if not cached:
            codes = torch.cat([_codes(m, k, tensors, folder, v1) for m in modules], dim=1)
            cached["qweight"] = marlin.pack_marlin(codes)
            cached["scales"] = marlin.permute_scales(torch.cat([tensors[f"{m}.scales"].read() for m in modules], 1))
        return cached

    def take(buffer: str) -> Callable[[], torch.Tensor]:
        return lambda: tile().pop(buffer)

    return [(f"{name}.qweight", torch.int32, (k // 16, 2 * n), take("qweight")),
            (f"{name}.scales", scale_dtype, (k // marlin.GROUP_SIZE, n), take("scales"))]


def _codes(module: str, k: int, tensors: dict[str, StoredTensor], folder: Path, v1: bool) -> torch.Tensor:
    """uint8 codes ``[K, N]`` of one GPTQ linear, after checking it has no act-order permutation and only
    the symmetric zero."""
    g_idx = tensors[f"{module}.g_idx"].read()
    if not torch.equal(g_idx.long(), torch.arange(k) // marlin.GROUP_SIZE):
        raise CpmkitError(f"{folder}: {module}.g_idx is not k // {marlin.GROUP_SIZE} (act-order weights); CPM.cu's "
                          "converter asserts desc_act == False")
    qweight = tensors[f"{module}.qweight"].read()
    n = qweight.shape[1]
    zeros = unpack_qzeros(tensors[f"{module}.qzeros"].read(), marlin.BITS, n, v1)
    if not bool((zeros == SYM_ZERO).all()):
        raise CpmkitError(f"{folder}: {module}.qzeros holds zero points other than {SYM_ZERO}; Marlin's symmetric "
                          "4-bit cannot store them")
    return unpack_rows(qweight, marlin.BITS, k)


def convert_to_marlin(ck: Checkpoint, out: Path, *, calibration: Calibration, damp: float = DEFAULT_DAMP,
                      device: str = "cpu", overwrite: bool = False,
                      progress: Callable[[Iterable], Iterable] = iter,
                      log: Callable[[str], None] = lambda line: None) -> Path:
    """Calibrate a 4-bit g128 symmetric GPTQ of ``ck`` (act-order within static groups) beside ``out``,
    then repack it into the CPM.cu folder ``out``."""
    spec = GPTQSpec(GroupSpec(marlin.BITS, marlin.GROUP_SIZE, True), act_order=True, static_groups=True, damp=damp)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gptq-", dir=out.parent) as tmp:
        gptq = convert_to_gptq(ck, Path(tmp) / "gptq", spec=spec, layout="gptq", calibration=calibration,
                               device=device, progress=progress, log=log)
        return repack_gptq(gptq, out, ck, overwrite=overwrite)
