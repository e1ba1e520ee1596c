"""Checkpoint in, GGUF file out, in one streaming pass: each checkpoint tensor is read, renamed, permuted,
typed, quantized and written before the next is read (MoE experts: one layer's projection at a time).

The file is what llama.cpp's tools would produce from the same checkpoint (checked at llama.cpp 4df29be4f):

* F32 / F16 / BF16 files are ``convert_hf_to_gguf.py --outtype f32|f16|bf16``: its tensor order (LongRoPE
  factors first, then each weight file's tensors sorted by name), its types (1-D tensors, ``*_norm`` and the
  MoE router F32, the rest the file type) and its key order (``ModelBase.prepare_metadata``).
* Quantized files are that F32/BF16 file passed through ``llama-quantize``: tensors in the loader's order
  (``weight_name_comparer``: non-block tensors by name, then block by block), types from llama-quantize's
  rules (``cpmkit.convert.gguf.mix``), data quantized from float32 (``cpmkit.convert.gguf.quantize``, with
  the imatrix's per-column weights when given), and ``general.quantization_version`` and
  ``general.file_type`` moved to the end of the keys, followed by the ``quantize.imatrix.*`` keys.

Deliberate differences from llama.cpp's converter, each because llama.cpp would otherwise run the model
differently from the checkpoint's own code: MiniCPM-MoE experts are merged (the converter cannot map
them); LongRoPE checkpoints whose max_position_embeddings differs from the original get
``rope.scaling.original_context_length`` and ``rope.scaling.attn_factor``; MiniCPM5's pre-tokenizer is
recognised from tokenizer.json's regexes rather than a hash of one tokenization.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter, Keys, size_label
from gguf import Metadata as ModelCard

from cpmkit.atomic import atomic_file
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gguf import mix as gguf_mix
from cpmkit.convert.gguf.capability import gguf_reason, ternary_block_reason
from cpmkit.convert.gguf.families import (
    GGUFFamily,
    gguf_family,
    permute_rows,
    rope_factor_tensors,
)
from cpmkit.convert.gguf.imatrix import importance
from cpmkit.convert.gguf.quantize import QuantizeWorkers
from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.file import GGUFFileWriter, Metadata, TensorSlot
from cpmkit.formats.gguf.imatrix import ImatrixData
from cpmkit.formats.torch_bin import load_state_dict
from cpmkit.quant.ternary import detect_ternary
from cpmkit.spec import Family

Progress = Callable[[Iterable], Iterable]
GGML_QUANT_VERSION = 2
FLOAT_TYPES = {QType.F32, QType.F16, QType.BF16}
TERNARY_TYPES = {QType.TQ1_0, QType.TQ2_0}
IMATRIX_STRING_LIMIT = 127  # quantize.cpp copies the imatrix file/dataset names into char[128] overrides


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where its data comes from and how it is stored."""

    name: str
    sources: tuple[str, ...]  # checkpoint tensors (experts in order, stacked on a new first axis); () = generated
    shape: tuple[int, ...]  # torch order
    permute_heads: int | None
    qtype: QType

    @property
    def slot(self) -> TensorSlot:
        return TensorSlot(self.name, self.qtype, self.shape)


def convert_to_gguf(ck: Checkpoint, out_path: str | Path, *, file_type: str, imatrix: ImatrixData | None = None,
                    tensor_types: Iterable[str] = (), overwrite: bool = False, progress: Progress = iter,
                    allow_scale_mismatch: bool = False) -> Path:
    """Write ``ck`` as a GGUF file of ``file_type`` (a ``gguf_mix.GGUFFileType`` name: F32, F16, BF16, Q8_0,
    Q4_K_M, TQ2_0, ...) to ``out_path`` and return the path.

    ``imatrix``: importance statistics (``read_imatrix`` or ``compute_gguf_imatrix``) used as llama-quantize
    uses them. ``tensor_types``: ``REGEX=TYPE`` overrides (llama-quantize ``--tensor-type``). The file is
    written under a temporary name and renamed when complete; an existing ``out_path`` is refused unless
    ``overwrite``. ``progress`` wraps the per-tensor loop. ``allow_scale_mismatch`` converts a MiniCPM3
    checkpoint whose muP scales differ from the ones llama.cpp hard-codes (with a warning: llama.cpp will
    run it with 12/1.4/256)."""
    out_path = Path(out_path)
    ftype = file_type_named(file_type)
    _check_target(ck, allow_scale_mismatch)
    family = gguf_family(ck.spec)
    tensor_types = tuple(tensor_types)
    if ftype.default_type in FLOAT_TYPES and (imatrix is not None or tensor_types):
        raise CpmkitError(f"--imatrix and --tensor-type apply to quantized file types, not {ftype.value}")
    plan = plan_tensors(ck, family, ftype, tensor_types, imatrix is not None)
    generated = dict(rope_factor_tensors(ck.spec))
    metadata = gguf_metadata(ck, family, plan, ftype, imatrix)
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        # one stream in plan order: a .bin shard stays open while consecutive tensors come from it
        stream = ck.stream([hf for p in plan for hf in p.sources])
        with QuantizeWorkers() as workers, GGUFFileWriter(tmp, metadata, [p.slot for p in plan]) as writer:
            for p in progress(plan):
                data = _assembled(p, [next(stream)[1] for _ in p.sources]) if p.sources else generated[p.name]
                weights = importance(imatrix, p.name, p.shape) if imatrix is not None else None
                if ftype.default_type in TERNARY_TYPES and p.qtype in TERNARY_TYPES:
                    _check_ternary(p, data)
                writer.write(p.name, _encoded(workers, data, p.qtype, weights, p.name))
                del data  # before the next tensor is read: one checkpoint tensor in memory at a time
    return out_path


def file_type_named(name: str) -> gguf_mix.GGUFFileType:
    try:
        return gguf_mix.GGUFFileType(name.upper())
    except ValueError:
        supported = ", ".join(f.value for f in gguf_mix.GGUFFileType)
        raise CpmkitError(f"GGUF file type {name!r} is not supported; supported: {supported}") from None


def _encoded(workers: QuantizeWorkers, data: torch.Tensor, qtype: QType, weights: torch.Tensor | None,
             name: str) -> Iterator[torch.Tensor]:
    """The tensor's bytes in row chunks, quantized on ``workers`` (a 3-D tensor expert by expert, each with
    its slice of the importance weights, as llama-quantize does). Rows are quantized independently, so
    chunking does not change a byte."""
    matrix = data if data.dim() in (2, 3) else data.reshape(-1, data.shape[-1])
    return (torch.from_numpy(chunk) for chunk in workers.submit(matrix, qtype, weights, name=name))


def _check_target(ck: Checkpoint, allow_scale_mismatch: bool) -> None:
    reason = gguf_reason(ck.spec)
    if reason is None:
        return
    scales_only = ck.spec.family is Family.MINICPM3  # the only reason the target gives for MiniCPM3
    if not (scales_only and allow_scale_mismatch):
        hint = " (--allow-scale-mismatch to convert anyway)" if scales_only else ""
        raise CpmkitError(f"{ck.root}: cannot convert to GGUF: {reason}{hint}")
    warnings.warn(f"{ck.root}: {reason}; converting anyway, llama.cpp will run it with its own scales",
                  stacklevel=3)


def _check_ternary(p: PlannedTensor, data: torch.Tensor) -> None:
    """TQ1_0/TQ2_0 hold one scale per 256 weights: refuse, as the ``gguf-ternary`` target does, weights that
    are not ternary at a granularity those blocks keep exactly."""
    for matrix in data if data.dim() == 3 else data[None]:
        report = detect_ternary(matrix)
        reason = ternary_block_reason(None if report is None else report.granularity)
        if reason is not None:
            raise CpmkitError(f"{p.name} ({', '.join(p.sources)}): cannot store as {p.qtype.name}: {reason}")


# ---- planning -------------------------------------------------------------------------------------------


def plan_tensors(ck: Checkpoint, family: GGUFFamily, ftype: gguf_mix.GGUFFileType,
                 tensor_types: tuple[str, ...] = (), has_imatrix: bool = False) -> list[PlannedTensor]:
    """Every GGUF tensor of the file, typed, in the order it is written."""
    spec = ck.spec
    order = _file_order(ck)
    grouped: dict[str, list[tuple[int | None, str]]] = {}
    for hf_name in ck.tensors:
        mapped = family.map_name(hf_name)
        if mapped is not None:
            grouped.setdefault(mapped.gguf, []).append((mapped.expert, hf_name))
    untyped = [(name, (), tuple(t.shape), None) for name, t in rope_factor_tensors(spec)]
    for name, members in sorted(grouped.items(), key=lambda kv: max(order[hf] for _, hf in kv[1])):
        experts = [e for e, _ in members]
        sources = tuple(hf for _, hf in sorted(members, key=lambda m: m[0] or 0))
        shape = ck.tensors[sources[0]].shape
        if experts[0] is not None:
            assert sorted(experts) == list(range(len(experts))), (name, experts)
            shape = (len(sources), *shape)
        untyped.append((name, sources, tuple(shape), family.permute_heads(spec, sources[0])))
    if ftype.default_type in FLOAT_TYPES:
        # convert_hf_to_gguf.py's order and ModelBase.prepare_tensors' types
        return [PlannedTensor(n, s, shape, h, _converter_type(n, shape, ftype.default_type))
                for n, s, shape, h in untyped]
    overrides = [gguf_mix.TypeOverride.parse(t) for t in tensor_types]
    position = {name: i for i, name in enumerate(gguf_mix.loader_order(t[0] for t in untyped))}
    untyped.sort(key=lambda t: position[t[0]])
    types = gguf_mix.choose_tensor_types(
        [gguf_mix.TensorSpec(n, shape, _converter_type(n, shape, QType.F32)) for n, _, shape, _ in untyped], ftype,
        n_layer=spec.num_layers, n_expert=spec.moe.num_experts if spec.moe else 0,
        n_gqa=spec.num_heads // spec.num_kv_heads, has_imatrix=has_imatrix, overrides=overrides)
    return [PlannedTensor(n, s, shape, h, types[n]) for n, s, shape, h in untyped]


def _file_order(ck: Checkpoint) -> dict[str, int]:
    """Position of each tensor in convert_hf_to_gguf.py's reading order: weight files by name, a
    safetensors file's tensors by name (gguf-py ``SafetensorsLocal``), a .bin file's in stored order."""
    order: dict[str, int] = {}
    for file in ck.weight_files:
        names = [n for n, r in ck.tensors.items() if r.file == file]
        if file.suffix == ".bin":
            stored = list(load_state_dict(file))
            names.sort(key=stored.index)
        else:
            names.sort()
        order.update((n, len(order)) for n in names)
    return order


def _converter_type(name: str, shape: tuple[int, ...], default: QType) -> QType:
    """``ModelBase.prepare_tensors``: 1-D tensors, norms, the MoE router and non-weights stay F32."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return QType.F32
    return default


def _assembled(p: PlannedTensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The GGUF tensor from its checkpoint tensors: experts stacked, q/k rows permuted."""
    data = tensors[0] if len(tensors) == 1 else torch.stack(tensors)
    return permute_rows(data, p.permute_heads) if p.permute_heads else data


# ---- metadata -------------------------------------------------------------------------------------------


def gguf_metadata(ck: Checkpoint, family: GGUFFamily, plan: list[PlannedTensor], ftype: gguf_mix.GGUFFileType,
                  imatrix: ImatrixData | None) -> Metadata:
    """The file's keys in llama.cpp's order (``ModelBase.prepare_metadata``, then llama-quantize's edits)."""
    meta = Metadata(family.arch)
    meta.add(Keys.General.TYPE, "model")
    meta.add_typed(_model_card(ck, family, plan))
    for key, value in family.parameters(ck.spec, ck.config, ftype.llama_file_type):
        meta.add(key, value)
    meta.add(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
    family.add_vocab(meta, ck.root, ck.config)
    if ftype.default_type not in FLOAT_TYPES:
        meta.put_last(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
        meta.put_last(Keys.General.FILE_TYPE, ftype.llama_file_type)
        if imatrix is not None:
            _add_imatrix_keys(meta, imatrix)
    return meta


def _model_card(ck: Checkpoint, family: GGUFFamily, plan: list[PlannedTensor]) -> dict[str, Any]:
    """general.* from gguf-py's ``Metadata.load`` heuristics (model card, config, folder name), as the
    converter writes them, with the size label from the tensors' parameter counts."""
    total, shared, expert, experts = _parameter_counts(plan)
    card = ModelCard.load(None, ck.root, None, total)
    if card.name is None:
        card.name = ck.root.name
    if card.size_label is None and total > 0:
        card.size_label = size_label(total, shared, expert, experts)
    scratch = GGUFWriter(None, family.arch)
    card.set_gguf_meta_model(scratch)
    return {k: v for k, v in scratch.kv_data[0].items() if k != Keys.General.ARCHITECTURE}


def _parameter_counts(plan: list[PlannedTensor]) -> tuple[int, int, int, int]:
    """``GGUFWriter.get_total_parameter_count``: total, shared, per-expert and expert count."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for p in plan:
        size = math.prod(p.shape)
        if "_exps." in p.name and len(p.shape) >= 3:
            expert += size // p.shape[0]
            expert_sum += p.shape[0]
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert_tensors if n_expert_tensors else 0)


def _add_imatrix_keys(meta: Metadata, imatrix: ImatrixData) -> None:
    """tools/quantize/quantize.cpp's kv overrides, applied after general.file_type."""
    if imatrix.path is not None:
        meta.put_last("quantize.imatrix.file", imatrix.path[:IMATRIX_STRING_LIMIT])
    if imatrix.datasets:
        meta.put_last("quantize.imatrix.dataset", imatrix.datasets[0][:IMATRIX_STRING_LIMIT])
    meta.put_last("quantize.imatrix.entries_count", len(imatrix.entries))
    if imatrix.chunk_count > 0:
        meta.put_last("quantize.imatrix.chunks_count", imatrix.chunk_count)
