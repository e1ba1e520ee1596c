"""The verification report: one versioned JSON document per reference model, written by ``cpmkit verify`` and
``cpmkit release`` and rendered by :mod:`cpmkit.verify.markdown` and :mod:`cpmkit.verify.html`.

Every field is declared once, here, with its meaning and unit in the field's metadata. The same declarations
drive reading (:meth:`Report.from_json`), checking (:meth:`Report.validate`) and the JSON Schema published for
other tools (:func:`schema_text`, kept in ``report.schema.json`` beside this file). All fields are required;
a field that may be unknown is nullable and written as ``null``.

Versioning: ``schema`` is ``"cpmkit.verify/<N>"``. N changes whenever a reader of the old version could
reject or misread a new document: a field added, removed or renamed, a unit or meaning changed, a new enum
value, other KLD bin edges. A reader accepts exactly its own N and rejects any other with a message naming
both versions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from cpmkit import __version__
from cpmkit.atomic import atomic_file
from cpmkit.errors import CpmkitError

SCHEMA_NAME = "cpmkit.verify"
SCHEMA_VERSION = 2
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"

# KLD histogram edges, in nats: 4 log-spaced bins per decade from 1e-6 to 10, fixed by the schema version so
# that every artifact of every report of a version is binned alike.
KLD_BINS_PER_DECADE = 4
KLD_LOWEST_DECADE, KLD_HIGHEST_DECADE = -6, 1
KLD_BIN_EDGES: tuple[float, ...] = tuple(
    10.0 ** (k / KLD_BINS_PER_DECADE)
    for k in range(KLD_LOWEST_DECADE * KLD_BINS_PER_DECADE, KLD_HIGHEST_DECADE * KLD_BINS_PER_DECADE + 1))

SHA256_PATTERN = "^[0-9a-f]{64}$"
NOISY_SPREAD = 0.25  # relative interquartile range of repeated timings above which a speed is flagged
# Relative tolerance for stored numbers that are functions of other stored numbers (delta_ppl_pct, speedup):
# loose enough for any order of float operations, tight enough to catch a number from another run.
DERIVED_RTOL = 1e-6


class DeviceType(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class KernelPath(str, Enum):
    TORCH = "torch"  # the pure-torch fallback: dequantize, then matmul
    TRITON = "triton"  # cpmkit's Triton dequant-GEMM kernels


class Dtype(str, Enum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


DTYPE_BITS = {Dtype.BFLOAT16: 16, Dtype.FLOAT16: 16, Dtype.FLOAT32: 32}


def _f(doc: str, unit: str | None = None, **constraints: Any):
    """A dataclass field carrying its documentation, unit and JSON-Schema constraints (``minimum``,
    ``exclusiveMinimum``, ``maximum``, ``pattern``, ``const``; on an array they apply to each item)."""
    return field(metadata={"doc": doc, "unit": unit, **constraints})


@dataclass(frozen=True)
class Reference:
    """The checkpoint every artifact is measured against."""

    source: str = _f("local path or Hugging Face repo id the checkpoint was read from", minLength=1)
    family: str = _f("cpmkit model family (cpmkit.spec.Family: minicpm, minicpm3, llama)", pattern="^[a-z0-9_]+$")
    architecture: str = _f("config.json architectures[0], e.g. MiniCPMForCausalLM", minLength=1)
    parameter_count: int = _f("number of parameters", "parameters", minimum=1)
    dtype: Dtype = _f("dtype the weights are stored in")
    file_size_bytes: int = _f("total size of the weight files", "bytes", minimum=1)
    content_sha256: str = _f("SHA-256 of the weight files' bytes, concatenated in sorted file-name order",
                             "hex digest", pattern=SHA256_PATTERN)


@dataclass(frozen=True)
class Evaluation:
    """The tokens every model is scored on (llama-perplexity's windows)."""

    text_source: str = _f("'builtin', 'file:NAME' or 'dataset:NAME'", pattern="^(builtin|file:.+|dataset:.+)$")
    text_sha256: str = _f("SHA-256 of the text's UTF-8 bytes", "hex digest", pattern=SHA256_PATTERN)
    ctx: int = _f("tokens per window", "tokens", minimum=4)
    windows: int = _f("number of windows scored", "windows", minimum=1)
    scored_tokens: int = _f("predictions scored: windows x (ctx - ctx//2 - 1), the second half of each window",
                            "tokens", minimum=1)


@dataclass(frozen=True)
class Device:
    """A machine that ran a measurement."""

    type: DeviceType = _f("torch device type")
    name: str = _f("device name, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model", minLength=1)
    kernel_path: KernelPath = _f("what ran the quantized linears: 'torch' (dequantize, then matmul) or "
                                 "'triton' (cpmkit's dequant-GEMM kernels)")


@dataclass(frozen=True)
class ReferenceMetrics:
    """The reference's own score on the evaluation tokens."""

    ppl: float = _f("perplexity, exp(mean NLL)", exclusiveMinimum=0)
    ppl_uncertainty: float = _f("ppl x standard error of the mean NLL (llama-perplexity's +/-)", minimum=0)


@dataclass(frozen=True)
class Kld:
    """KL divergence KL(reference || artifact) of the next-token distributions, over the scored tokens."""

    mean: float = _f("mean over scored tokens", "nats", minimum=0)
    p99: float = _f("99th percentile", "nats", minimum=0)
    max: float = _f("largest value", "nats", minimum=0)


@dataclass(frozen=True)
class KldHistogram:
    """Per-token KLD counted into the report's ``kld_bin_edges``: bin i holds edges[i] <= kld < edges[i+1]."""

    underflow: int = _f("tokens with kld < kld_bin_edges[0] (including 0)", "tokens", minimum=0)
    counts: tuple[int, ...] = _f("one count per bin, len(kld_bin_edges) - 1 of them", "tokens", minimum=0)
    overflow: int = _f("tokens with kld >= kld_bin_edges[-1]", "tokens", minimum=0)

    @classmethod
    def from_values(cls, kld: Any) -> KldHistogram:
        """Bin per-token KLD values (any array-like, nats) into :data:`KLD_BIN_EDGES`."""
        values = np.asarray(kld, dtype=np.float64).ravel()
        if not np.isfinite(values).all():
            raise CpmkitError("KLD histogram: the per-token KLD values hold NaN or Inf")
        # searchsorted(right) gives 0 below the first edge, i+1 for edges[i] <= v < edges[i+1], len at the top
        slot = np.searchsorted(np.asarray(KLD_BIN_EDGES), values, side="right")
        counts = np.bincount(slot, minlength=len(KLD_BIN_EDGES) + 1)
        return cls(int(counts[0]), tuple(int(c) for c in counts[1:-1]), int(counts[-1]))

    @property
    def total(self) -> int:
        return self.underflow + sum(self.counts) + self.overflow


@dataclass(frozen=True)
class LinearSpeed:
    """One linear shape's dequant-GEMM latency against the BF16 matmul, at one batch size."""

    shape: tuple[int, int] = _f("weight shape [N, K]: output features, input features", "elements", minimum=1)
    weight_type: str = _f("quantized type of this weight, e.g. Q4_K, Q6_K, mlx4g64", minLength=1)
    batch: int = _f("activation rows M (tokens per call)", "tokens", minimum=1)
    quant_ms: float = _f("latency of the dequant-GEMM", "ms", exclusiveMinimum=0)
    bf16_ms: float = _f("latency of torch's BF16 matmul on the same device", "ms", exclusiveMinimum=0)
    speedup: float = _f("bf16_ms / quant_ms", "x", exclusiveMinimum=0)
    spread: float = _f("the larger relative spread of the two timings: interquartile range / median of the "
                       "repeats", "fraction", minimum=0)
    noisy: bool = _f("spread > 0.25: the machine was too busy for this number to be trusted")

    @classmethod
    def measured(cls, shape: tuple[int, int], weight_type: str, batch: int, quant_ms: float,
                 bf16_ms: float, spread: float) -> LinearSpeed:
        return cls(tuple(shape), weight_type, batch, quant_ms, bf16_ms, bf16_ms / quant_ms, spread,
                   spread > NOISY_SPREAD)


@dataclass(frozen=True)
class EndToEnd:
    """Whole-model throughput for one sequence, the artifact against BF16 on the same device."""

    prefill_tokens: int = _f("prompt length timed", "tokens", minimum=1)
    decode_tokens: int = _f("tokens generated and timed after the prompt", "tokens", minimum=1)
    prefill_tok_s: float = _f("artifact prefill throughput", "tokens/s", exclusiveMinimum=0)
    decode_tok_s: float = _f("artifact decode throughput", "tokens/s", exclusiveMinimum=0)
    bf16_prefill_tok_s: float = _f("BF16 reference prefill throughput", "tokens/s", exclusiveMinimum=0)
    bf16_decode_tok_s: float = _f("BF16 reference decode throughput", "tokens/s", exclusiveMinimum=0)
    spread: float = _f("the largest relative spread of the four timings: interquartile range / median of the "
                       "repeats", "fraction", minimum=0)
    noisy: bool = _f("spread > 0.25: the machine was too busy for these numbers to be trusted")


@dataclass(frozen=True)
class Speed:
    """Speed of one artifact; its device may differ from the one that scored quality."""

    device: Device = _f("where the speed was measured")
    linears: tuple[LinearSpeed, ...] = _f("per linear shape and batch; may be empty")
    end_to_end: EndToEnd | None = _f("whole-model throughput; null when not measured")


@dataclass(frozen=True)
class Gate:
    """A release's quality budget for one artifact, and whether the artifact met it."""

    max_kld: float | None = _f("largest mean KLD allowed; null: no limit", "nats", minimum=0)
    max_delta_ppl: float | None = _f("largest ΔPPL allowed; null: no limit", "%", minimum=0)
    passed: bool = _f("the artifact met every limit (a release does not push one that did not)")
    misses: tuple[str, ...] = _f("each limit it missed, as a phrase (empty when passed)")


@dataclass(frozen=True)
class Artifact:
    """One converted model, scored on the same tokens as the reference."""

    name: str = _f("'<format>:<variant>', unique in the report", minLength=1)
    format: str = _f("artifact format: gguf, mlx, ...", pattern="^[a-z][a-z0-9-]*$")
    variant: str = _f("quantization within the format, e.g. Q4_K_M or 4bit-g64", minLength=1)
    path: str = _f("where the artifact is, relative to the report file's folder ('/'-separated)", minLength=1)
    file_size_bytes: int = _f("total size of the artifact's files", "bytes", minimum=1)
    bits_per_weight: float = _f("8 x bytes of all model tensors / reference.parameter_count",
                                "bits", exclusiveMinimum=0)
    ppl: float = _f("perplexity on the evaluation tokens", exclusiveMinimum=0)
    ppl_uncertainty: float = _f("ppl x standard error of the mean NLL", minimum=0)
    delta_ppl_pct: float = _f("100 x (ppl / reference_metrics.ppl - 1)", "%")
    kld: Kld = _f("KL divergence from the reference")
    top1_agreement: float = _f("fraction of scored tokens where both models' most likely next token agree",
                               "fraction", minimum=0, maximum=1)
    kld_histogram: KldHistogram = _f("distribution of per-token KLD")
    speed: Speed | None = _f("null when speed was not measured")
    gate: Gate | None = _f("the quality budget a release held it to; null when it had none")


@dataclass(frozen=True)
class Report:
    """A cpmkit verification report."""

    schema: str = _f("document type and version", const=SCHEMA)
    cpmkit_version: str = _f("version of cpmkit that wrote the document", minLength=1)
    reference: Reference = _f("the reference checkpoint")
    evaluation: Evaluation = _f("the evaluation text and windows")
    device: Device = _f("where every model was scored (PPL, KLD, top-1)")
    reference_metrics: ReferenceMetrics = _f("the reference's perplexity")
    kld_bin_edges: tuple[float, ...] = _f("histogram bin edges: 10^(k/4) for k = -24..4, fixed for this schema "
                                          "version", "nats", exclusiveMinimum=0)
    artifacts: tuple[Artifact, ...] = _f("the measured artifacts, in the order they were added")

    @classmethod
    def new(cls, reference: Reference, evaluation: Evaluation, device: Device,
            reference_metrics: ReferenceMetrics) -> Report:
        """An empty report of this cpmkit's schema version; add artifacts with :meth:`with_artifact`."""
        return cls(SCHEMA, __version__, reference, evaluation, device, reference_metrics, KLD_BIN_EDGES, ())

    def artifact(self, name: str) -> Artifact:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise CpmkitError(f"report has no artifact {name!r}; it has: {', '.join(self.names) or 'none'}")

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.artifacts]

    def with_artifact(self, artifact: Artifact, *, replace: bool = False) -> Report:
        """This report plus ``artifact`` (appended; with ``replace``, an artifact of the same name is replaced
        in place)."""
        if artifact.name in self.names and not replace:
            raise CpmkitError(f"report already holds artifact {artifact.name}; give the new one another name "
                              "or ask to replace it")
        if artifact.name in self.names:
            artifacts = tuple(artifact if a.name == artifact.name else a for a in self.artifacts)
        else:
            artifacts = self.artifacts + (artifact,)
        new = dataclasses.replace(self, artifacts=artifacts)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise :class:`CpmkitError` naming the first bad field."""
        _check(Report, self, "", None)
        ev = self.evaluation
        if ev.scored_tokens != ev.windows * (ev.ctx - ev.ctx // 2 - 1):
            raise _bad("evaluation.scored_tokens", f"is {ev.scored_tokens}, but {ev.windows} windows of ctx "
                       f"{ev.ctx} score {ev.windows * (ev.ctx - ev.ctx // 2 - 1)}")
        if tuple(self.kld_bin_edges) != KLD_BIN_EDGES:
            raise _bad("kld_bin_edges", f"differ from {SCHEMA}'s fixed edges (10^(k/4), k = -24..4)")
        seen: set[str] = set()
        for i, a in enumerate(self.artifacts):
            if a.name in seen:
                raise _bad(f"artifacts[{i}].name", f"{a.name!r} appears twice")
            seen.add(a.name)
            _check_artifact(a, self, f"artifacts[{i}]")

    def to_json(self) -> str:
        """The document's text: fields in declaration order, floats in shortest round-trip form, arrays of
        numbers on one line, a final newline. Equal reports give identical text."""
        self.validate()
        return _dump(_encode(self), "") + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CpmkitError(f"report: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(data, dict):
            raise CpmkitError(f"report: must be a JSON object, got {_kind(data)}")
        _check_schema_version(data.get("schema"))
        report = _decode(Report, data, "")
        report.validate()
        return report


def merge_reports(base: Report, other: Report, *, replace: bool = False) -> Report:
    """``base`` with ``other``'s artifacts added; both must describe the same reference, tokens and device."""
    for f in fields(Report):
        if f.name != "artifacts" and getattr(base, f.name) != getattr(other, f.name):
            raise CpmkitError(f"cannot merge reports: they differ in {f.name} "
                              f"({_first_difference(getattr(base, f.name), getattr(other, f.name), f.name)}); "
                              "artifacts must be measured against the same reference on the same tokens")
    for a in other.artifacts:
        base = base.with_artifact(a, replace=replace)
    return base


def read_report(path: str | Path) -> Report:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CpmkitError(f"{path}: cannot read report ({e})") from None
    try:
        return Report.from_json(text)
    except CpmkitError as e:
        raise CpmkitError(f"{path}: {e}") from None


def write_report(report: Report, path: str | Path) -> None:
    """Write atomically, replacing any report already at ``path``."""
    text = report.to_json()
    with atomic_file(Path(path), overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def delta_ppl_pct(ppl: float, reference_ppl: float) -> float:
    return 100.0 * (ppl / reference_ppl - 1.0)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of this version's document, generated from the dataclasses."""
    defs: dict[str, Any] = {}
    root = _object_schema(Report, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": SCHEMA, **root,
            "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    """The exact contents of ``report.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


# ---- checking --------------------------------------------------------------------------------------------

def _bad(where: str, problem: str) -> CpmkitError:
    return CpmkitError(f"report field {where}: {problem}")


def _check_schema_version(schema: Any) -> None:
    if schema is None:
        raise _bad("schema", f"missing; this is not a {SCHEMA_NAME} document")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_NAME + "/"):
        raise _bad("schema", f"is {schema!r}; this is not a {SCHEMA_NAME} document")
    if schema != SCHEMA:
        raise _bad("schema", f"the document is {schema}, but cpmkit {__version__} reads only {SCHEMA}; "
                   f"read it with the cpmkit version that wrote it")


def _check_artifact(a: Artifact, report: Report, where: str) -> None:
    if a.name != f"{a.format}:{a.variant}":
        raise _bad(f"{where}.name", f"is {a.name!r}, but format and variant make {a.format}:{a.variant}")
    posix, windows = PurePosixPath(a.path), PureWindowsPath(a.path)
    if posix.is_absolute() or windows.is_absolute() or "\\" in a.path or ".." in posix.parts:
        raise _bad(f"{where}.path", f"{a.path!r} must be relative to the report's folder, '/'-separated, "
                   "without '..'")
    expected = delta_ppl_pct(a.ppl, report.reference_metrics.ppl)
    if not math.isclose(a.delta_ppl_pct, expected, rel_tol=DERIVED_RTOL, abs_tol=1e-9):
        raise _bad(f"{where}.delta_ppl_pct", f"is {a.delta_ppl_pct!r}, but ppl {a.ppl!r} against the reference's "
                   f"{report.reference_metrics.ppl!r} gives {expected!r}")
    for part in ("mean", "p99"):
        if getattr(a.kld, part) > a.kld.max:
            raise _bad(f"{where}.kld.{part}", f"{getattr(a.kld, part)!r} exceeds kld.max {a.kld.max!r}")
    hist = a.kld_histogram
    if len(hist.counts) != len(report.kld_bin_edges) - 1:
        raise _bad(f"{where}.kld_histogram.counts", f"has {len(hist.counts)} bins; the edges make "
                   f"{len(report.kld_bin_edges) - 1}")
    if hist.total != report.evaluation.scored_tokens:
        raise _bad(f"{where}.kld_histogram", f"counts {hist.total} tokens, but evaluation.scored_tokens is "
                   f"{report.evaluation.scored_tokens}")
    if a.speed is not None:
        keys: set[tuple] = set()
        for j, lin in enumerate(a.speed.linears):
            at = f"{where}.speed.linears[{j}]"
            key = (lin.shape, lin.weight_type, lin.batch)
            if key in keys:
                raise _bad(at, f"shape {list(lin.shape)} {lin.weight_type} at batch {lin.batch} appears twice")
            keys.add(key)
            if not math.isclose(lin.speedup, lin.bf16_ms / lin.quant_ms, rel_tol=DERIVED_RTOL):
                raise _bad(f"{at}.speedup", f"is {lin.speedup!r}, but bf16_ms / quant_ms is "
                           f"{lin.bf16_ms / lin.quant_ms!r}")
            _check_noisy(lin, at)
        if a.speed.end_to_end is not None:
            _check_noisy(a.speed.end_to_end, f"{where}.speed.end_to_end")
    if a.gate is not None and a.gate.passed != (not a.gate.misses):
        raise _bad(f"{where}.gate.passed", f"is {a.gate.passed}, but the gate lists {len(a.gate.misses)} misses")


def _check_noisy(timing: LinearSpeed | EndToEnd, where: str) -> None:
    if timing.noisy != (timing.spread > NOISY_SPREAD):
        raise _bad(f"{where}.noisy", f"is {timing.noisy}, but spread {timing.spread!r} is "
                   f"{'above' if timing.spread > NOISY_SPREAD else 'within'} {NOISY_SPREAD}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_of(tp: Any) -> Any:
    """X for ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, tp
        return args[0]
    return None


def _check(tp: Any, value: Any, where: str, meta: Any) -> None:
    """Check a constructed value against its declared type and the field's constraints."""
    inner = _optional_of(tp)
    if inner is not None:
        if value is not None:
            _check(inner, value, where, meta)
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise _bad(where, f"must be a {tp.__name__}, got {type(value).__name__}")
        hints = _hints(tp)
        for f in fields(tp):
            _check(hints[f.name], getattr(value, f.name), f"{where}.{f.name}".lstrip("."), f.metadata)
        return
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, tuple):
            raise _bad(where, f"must be a tuple, got {type(value).__name__}")
        args = typing.get_args(tp)
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise _bad(where, f"must have {len(args)} items, got {len(value)}")
        for i, item in enumerate(value):
            _check(args[0], item, f"{where}[{i}]", meta)
        return
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            tp(value)
        except ValueError:
            raise _bad(where, f"is {value!r}; one of {', '.join(m.value for m in tp)}") from None
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, f"must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise _bad(where, f"must be finite, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, f"must be an integer, got {type(value).__name__}")
    elif tp is str:
        if not isinstance(value, str):
            raise _bad(where, f"must be a string, got {type(value).__name__}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, f"must be a boolean, got {type(value).__name__}")
    else:
        raise AssertionError(f"report field type {tp!r} has no check")
    _check_constraints(value, where, meta)


def _check_constraints(value: Any, where: str, meta: Any) -> None:
    if "const" in meta and value != meta["const"]:
        raise _bad(where, f"must be {meta['const']!r}, got {value!r}")
    if "minimum" in meta and value < meta["minimum"]:
        raise _bad(where, f"must be >= {meta['minimum']}, got {value!r}")
    if "exclusiveMinimum" in meta and value <= meta["exclusiveMinimum"]:
        raise _bad(where, f"must be > {meta['exclusiveMinimum']}, got {value!r}")
    if "maximum" in meta and value > meta["maximum"]:
        raise _bad(where, f"must be <= {meta['maximum']}, got {value!r}")
    if "minLength" in meta and len(value) < meta["minLength"]:
        raise _bad(where, "must not be empty")
    if "pattern" in meta and not re.search(meta["pattern"], value):
        raise _bad(where, f"{value!r} does not match {meta['pattern']}")


def _first_difference(a: Any, b: Any, where: str) -> str:
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        for f in fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                return _first_difference(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    return f"{where}: {a!r} vs {b!r}"


# ---- JSON text -------------------------------------------------------------------------------------------

def _encode(value: Any, tp: Any = Report) -> Any:
    """Plain JSON data in field order; float fields become floats so that 0 is written 0.0 and reads back
    equal."""
    if value is None:
        return None
    tp = _optional_of(tp) or tp
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return {f.name: _encode(getattr(value, f.name), hints[f.name]) for f in fields(tp)}
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return [_encode(v, item) for v in value]
    if isinstance(value, Enum):
        return value.value
    return float(value) if tp is float else value


def _dump(data: Any, indent: str) -> str:
    if isinstance(data, dict):
        inner = indent + "  "
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}" if items else "{}"
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + _dump(v, inner) for v in data) + f"\n{indent}]"
    return json.dumps(data, ensure_ascii=False, allow_nan=False)


def _decode(tp: Any, value: Any, where: str) -> Any:
    """Build the declared type from JSON data, rejecting missing, unknown and mistyped fields."""
    inner = _optional_of(tp)
    if inner is not None:
        return None if value is None else _decode(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _bad(where, f"must be an object, got {_kind(value)}")
        names = [f.name for f in fields(tp)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise _bad(f"{where}.{unknown[0]}".lstrip("."), f"unknown field (not in {SCHEMA})")
        hints = _hints(tp)
        kwargs = {}
        for name in names:
            at = f"{where}.{name}".lstrip(".")
            if name not in value:
                raise _bad(at, "missing")
            kwargs[name] = _decode(hints[name], value[name], at)
        return tp(**kwargs)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise _bad(where, f"must be an array, got {_kind(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise _bad(where, f"is {value!r}; one of {', '.join(m.value for m in tp)}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, f"must be a boolean, got {_kind(value)}")
        return value
    if not isinstance(value, tp) or isinstance(value, bool):
        raise _bad(where, f"must be {'a number' if tp is float else 'an integer' if tp is int else 'a string'}, "
                   f"got {_kind(value)}")
    return value


# ---- JSON Schema -----------------------------------------------------------------------------------------

_SCHEMA_KEYS = ("const", "minimum", "exclusiveMinimum", "maximum", "minLength", "pattern")


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    props = {f.name: _value_schema(hints[f.name], f.metadata, defs) for f in fields(cls)}
    return {"description": cls.__doc__.strip().splitlines()[0], "type": "object", "properties": props,
            "required": list(props), "additionalProperties": False}


def _value_schema(tp: Any, meta: Any, defs: dict[str, Any]) -> dict[str, Any]:
    doc = meta["doc"] + (f" [{meta['unit']}]" if meta.get("unit") else "")
    inner = _optional_of(tp)
    if inner is not None:
        return {"description": doc, "anyOf": [_bare_schema(inner, meta, defs), {"type": "null"}]}
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        schema = {"description": doc, "type": "array", "items": _bare_schema(args[0], meta, defs)}
        if args[-1] is not Ellipsis:
            schema.update(minItems=len(args), maxItems=len(args))
        return schema
    return {"description": doc, **_bare_schema(tp, meta, defs)}


def _bare_schema(tp: Any, meta: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    kind = {int: "integer", float: "number", str: "string", bool: "boolean"}[tp]
    return {"type": kind, **{k: meta[k] for k in _SCHEMA_KEYS if k in meta}}
