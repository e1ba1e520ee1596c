"""``cpmkit verify``: score artifacts against their BF16 reference on the same tokens, on one device.

A :class:`Verifier` holds one reference checkpoint, one evaluation text cut into llama-perplexity's windows,
and one device. The reference's log-probabilities at the scored positions are computed once and kept on
disk under a key of everything they depend on (the reference weights' SHA-256, the window token ids, ctx,
the device type, cpmkit's version), so verifying a shelf of artifacts, or verifying again later, runs the
reference model once. Each artifact then gets perplexity, KL divergence from the reference (mean, p99, max,
histogram), top-1 agreement, its size and bits per weight, and optionally its speed.

The cache holds float32 log-probs, windows x (ctx - ctx/2 - 1) x vocab x 4 bytes (the demo: 57 MB;
MiniCPM4's 73,448-token vocabulary at 40 windows of 512: 3 GB), memory-mapped while scoring.

Scoring runs in float32. On CPU the quantized linears dequantize once and keep the float32 weights
(``cache_dequantized``), since a perplexity pass calls each many times; speed is measured on a second copy
without that cache, in BF16 activations, which is what the CPU path costs per call. On CUDA both run
cpmkit's Triton dequant-GEMM kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from cpmkit import __version__
from cpmkit.atomic import atomic_file
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.plugin import LoadOptions
from cpmkit.convert.registry import artifact_plugin
from cpmkit.errors import CpmkitError
from cpmkit.kernels import Backend
from cpmkit.models import CausalLM
from cpmkit.models.reference import load_reference
from cpmkit.models.text import BUILTIN_TEXT, load_text
from cpmkit.models.windows import Windows, make_windows
from cpmkit.spec import ModelSpec
from cpmkit.tokenizer import Tokenizer
from cpmkit.verify import speed as speed_
from cpmkit.verify.html import write_html
from cpmkit.verify.markdown import write_markdown
from cpmkit.verify.perplexity import (
    Divergence,
    DivergenceAccumulator,
    Perplexity,
    nll_of,
    scored_logprobs,
    summarize_nll,
)
from cpmkit.verify.report import (
    NOISY_SPREAD,
    Artifact,
    Device,
    DeviceType,
    Dtype,
    EndToEnd,
    Evaluation,
    KernelPath,
    Kld,
    KldHistogram,
    Reference,
    ReferenceMetrics,
    Report,
    Speed,
    delta_ppl_pct,
    write_report,
)

ProgressFactory = Callable[[str, str], Callable[[Iterable], Iterable]]  # (description, unit) -> wrapper
SCORE_DTYPE = torch.float32
HASH_CHUNK = 1 << 24
CACHE_ENV = "CPMKIT_CACHE"
STORED_DTYPES = {torch.bfloat16: Dtype.BFLOAT16, torch.float16: Dtype.FLOAT16, torch.float32: Dtype.FLOAT32}
CPU_SCORING_NOTE = "dequantized weights cached for scoring"
CPU_SPEED_NOTE = "dequantize + matmul on every call"


def no_progress(description: str, unit: str) -> Callable[[Iterable], Iterable]:
    return iter


def default_cache_dir() -> Path:
    """``$CPMKIT_CACHE/reference``, else ``$XDG_CACHE_HOME/cpmkit/reference``, else ``~/.cache/cpmkit/reference``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "reference"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpmkit" / "reference"


@dataclass(frozen=True)
class EvalText:
    text: str
    source: str  # report's evaluation.text_source: builtin, file:NAME, dataset:NAME

    @classmethod
    def load(cls, text_file: str | Path | None = None, dataset: str | None = None) -> EvalText:
        text = load_text(text_file, dataset)
        if dataset is not None:
            return cls(text, f"dataset:{dataset}")
        if text_file is None or Path(text_file).resolve() == BUILTIN_TEXT:
            return cls(text, "builtin")
        return cls(text, f"file:{Path(text_file).name}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CpmkitError(f"--device {device}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CpmkitError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                threads = torch.get_num_threads()
                return f"{line.partition(':')[2].strip()}, {threads} thread{'s' if threads != 1 else ''}"
    return platform.processor() or platform.machine() or "CPU"


def _device(device: torch.device, note: str) -> Device:
    """The report's device; on CPU the name says how the torch path ran (the kernel path alone cannot)."""
    if device.type == "cuda":
        return Device(DeviceType.CUDA, device_name(device), KernelPath.TRITON)
    return Device(DeviceType.CPU, f"{device_name(device)}; {note}", KernelPath.TORCH)


def weights_sha256(ck: Checkpoint) -> str:
    """SHA-256 of the weight files' bytes, concatenated in sorted file-name order."""
    digest = hashlib.sha256()
    for file in sorted(ck.weight_files, key=lambda p: p.name):
        with open(file, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def describe_reference(ck: Checkpoint, source: str) -> Reference:
    stored = Counter(ref.dtype for ref in ck.tensors.values()).most_common(1)[0][0]
    if stored not in STORED_DTYPES:
        raise CpmkitError(f"{ck.root}: weights are stored as {stored}; a reference must be bf16, fp16 or fp32")
    return Reference(
        source=source, family=ck.spec.family.value, architecture=ck.spec.architecture,
        parameter_count=sum(int(np.prod(ref.shape)) for ref in ck.tensors.values()),
        dtype=STORED_DTYPES[stored], file_size_bytes=sum(f.stat().st_size for f in ck.weight_files),
        content_sha256=weights_sha256(ck))


def path_in_report(artifact: Path, report_dir: Path) -> str:
    """The artifact as the report names it: relative to the report's folder when inside it, else by name."""
    try:
        return artifact.resolve().relative_to(report_dir.resolve()).as_posix() or "."
    except ValueError:
        return artifact.name


class Verifier:
    """Artifacts of one reference, scored on one text and device; see the module docstring."""

    def __init__(self, ck: Checkpoint, source: str, text: EvalText, *, ctx: int = 512, chunks: int | None = None,
                 device: str = "auto", cache_dir: str | Path | None = None, progress: ProgressFactory = no_progress):
        self.ck = ck
        self.device = resolve_device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.progress = progress
        tok = Tokenizer(ck.root, ck.config)
        self.windows = make_windows(tok.encode(text.text), ctx, tok.special.bos_id if tok.special.add_bos else None,
                                    chunks)
        self.reference = describe_reference(ck, source)
        self.evaluation = Evaluation(text.source, hashlib.sha256(text.text.encode("utf-8")).hexdigest(), ctx,
                                     self.windows.tokens.shape[0], self.windows.n_scored)
        self.scoring_device = _device(self.device, CPU_SCORING_NOTE)
        self.speed_device = _device(self.device, CPU_SPEED_NOTE)
        self._reference_logprobs: np.ndarray | None = None
        self._reference_metrics: ReferenceMetrics | None = None
        self._decode_tokens: int | None = None
        self._bf16_timings: tuple[speed_.Timing, speed_.Timing] | None = None  # BF16 prefill and decode step

    # ---- the reference -----------------------------------------------------------------------------------

    @property
    def cache_key(self) -> str:
        parts = {"cpmkit": __version__, "weights": self.reference.content_sha256, "ctx": self.windows.ctx,
                 "windows": hashlib.sha256(self.windows.tokens.numpy().astype("<i8").tobytes()).hexdigest(),
                 "device": self.device.type, "dtype": str(SCORE_DTYPE)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @property
    def cache_file(self) -> Path:
        return self.cache_dir / f"{self.cache_key}.npy"

    def reference_logprobs(self) -> np.ndarray:
        """float32 [windows, scored positions, vocab]: from the disk cache, else computed and stored there."""
        if self._reference_logprobs is None:
            path = self.cache_file
            if not self._cached_shape_ok(path):
                self._store(path, self._score_reference())
            self._reference_logprobs = np.load(path, mmap_mode="r")
        return self._reference_logprobs

    def _cached_shape_ok(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            stored = np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # a truncated or foreign file: recompute over it
            return False
        expected = (*self.windows.targets.shape, self.ck.spec.vocab_size)
        return stored.dtype == np.float32 and stored.shape == expected

    def _score_reference(self) -> np.ndarray:
        model = load_reference(self.ck, SCORE_DTYPE, progress=self.progress("loading reference", "tensor")).to(self.device)
        windows = Windows(self.windows.tokens.to(self.device), self.windows.ctx)
        out = np.empty((*self.windows.targets.shape, self.ck.spec.vocab_size), dtype=np.float32)
        for i, lp in enumerate(self.progress("scoring reference", "window")(scored_logprobs(model, windows))):
            out[i] = lp[0].cpu().numpy()
        return out

    @staticmethod
    def _store(path: Path, logprobs: np.ndarray) -> None:
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.save(f, logprobs)

    def _window_logprobs(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        """The reference's log-probs of window ``i``, [1, scored positions, vocab]."""
        return torch.from_numpy(np.array(self.reference_logprobs()[i : i + 1])).to(device or self.device)

    def reference_metrics(self) -> ReferenceMetrics:
        if self._reference_metrics is None:
            targets = self.windows.targets
            nll = torch.cat([nll_of(self._window_logprobs(i, torch.device("cpu")), targets[i : i + 1])
                             for i in range(targets.shape[0])])
            ppl = summarize_nll(nll.flatten(), self.windows)
            self._reference_metrics = ReferenceMetrics(ppl.ppl, ppl.ppl_uncertainty)
        return self._reference_metrics

    def empty_report(self) -> Report:
        return Report.new(self.reference, self.evaluation, self.scoring_device, self.reference_metrics())

    # ---- artifacts ---------------------------------------------------------------------------------------

    def measure(self, path: str | Path, *, report_path: str, variant: str | None = None,
                speed: bool = True) -> Artifact:
        """Score the artifact at ``path``; ``report_path`` is where the report will say it is, ``variant``
        overrides the variant read from the artifact (a release names its targets)."""
        path = Path(path)
        description = artifact_plugin(path).describe(path)
        variant = variant or description.variant
        model = load_artifact(path, self.ck.spec, LoadOptions(SCORE_DTYPE, Backend.AUTO,
                                                              cache_dequantized=self.device.type == "cpu"))
        ppl, divergence, histogram = self._score(model.to(self.device), f"scoring {description.format}:{variant}")
        del model  # before the speed copy is loaded
        return Artifact(
            name=f"{description.format}:{variant}", format=description.format, variant=variant, path=report_path,
            file_size_bytes=description.file_size_bytes,
            bits_per_weight=description.bits_per_weight(self.reference.parameter_count),
            ppl=ppl.ppl, ppl_uncertainty=ppl.ppl_uncertainty,
            delta_ppl_pct=delta_ppl_pct(ppl.ppl, self.reference_metrics().ppl),
            kld=Kld(divergence.kld_mean, divergence.kld_p99, divergence.kld_max),
            top1_agreement=divergence.top1_agreement, kld_histogram=histogram,
            speed=self._speed(path) if speed else None, gate=None)

    def _score(self, model: CausalLM, description: str) -> tuple[Perplexity, Divergence, KldHistogram]:
        windows = Windows(self.windows.tokens.to(self.device), self.windows.ctx)
        targets = windows.targets
        divergence = DivergenceAccumulator()
        nll = []
        for i, cand in enumerate(self.progress(description, "window")(scored_logprobs(model, windows))):
            divergence.add(self._window_logprobs(i), cand)
            nll.append(nll_of(cand, targets[i : i + 1]).cpu())
        ppl = summarize_nll(torch.cat(nll).flatten(), self.windows)
        result = divergence.result()
        return ppl, result, KldHistogram.from_values(result.per_token_kld.numpy())

    def _speed(self, path: Path) -> Speed:
        model = load_artifact(path, self.ck.spec, LoadOptions(speed_.SPEED_DTYPE, Backend.AUTO,
                                                              cache_dequantized=False)).to(self.device)
        linears = speed_.linear_speeds(model, self.device)
        prompt = self.windows.tokens[:1, : min(speed_.PREFILL_TOKENS, self.windows.ctx)].to(self.device)
        probed = speed_.decode_length(model, prompt)  # also warms the decode path up
        if self._decode_tokens is None:  # one length for the session, so every artifact and BF16 decode alike
            self._decode_tokens = probed
        prefill, decode = speed_.prefill(model, prompt), speed_.decode(model, prompt, self._decode_tokens)
        del model
        if self._bf16_timings is None:
            bf16 = load_reference(self.ck, speed_.SPEED_DTYPE).to(self.device)
            speed_.decode_step_seconds(bf16, prompt, 1)  # warm-up
            self._bf16_timings = (speed_.prefill(bf16, prompt), speed_.decode(bf16, prompt, self._decode_tokens))
        bf16_prefill, bf16_decode = self._bf16_timings
        spread = max(t.spread for t in (prefill, decode, bf16_prefill, bf16_decode))
        rates = (speed_.tokens_per_s(prompt.shape[1], prefill), speed_.tokens_per_s(1, decode),
                 speed_.tokens_per_s(prompt.shape[1], bf16_prefill), speed_.tokens_per_s(1, bf16_decode))
        return Speed(self.speed_device, linears,
                     EndToEnd(prompt.shape[1], self._decode_tokens, *rates, spread, spread > NOISY_SPREAD))


def verify_artifact(artifact: str | Path, reference: str | Path, *, text: str | Path | None = None,
                    dataset: str | None = None, ctx: int = 512, chunks: int | None = None, device: str = "auto",
                    cache_dir: str | Path | None = None, speed: bool = True, report_dir: str | Path | None = None,
                    progress: ProgressFactory = no_progress) -> tuple[Report, str]:
    """Verify one artifact (a GGUF file, an MLX folder) against the checkpoint ``reference`` (a folder, a
    Hugging Face repo id, or ``demo``) on ``text`` (a file; default the built-in text) or ``dataset``.

    Returns the report (the reference row and this artifact) and the artifact's name in it. ``report_dir``:
    the folder the report will be written to (the artifact's path in the report is relative to it; default
    the current folder). ``cache_dir``: where reference log-probs are kept (default
    :func:`default_cache_dir`). ``speed=False`` skips the speed measurements.
    """
    path = Path(artifact)
    artifact_plugin(path)  # a clear error before the reference is read
    ck = Checkpoint.open(reference)
    verifier = Verifier(ck, str(reference), EvalText.load(text, dataset), ctx=ctx, chunks=chunks, device=device,
                        cache_dir=cache_dir, progress=progress)
    measured = verifier.measure(path, report_path=path_in_report(path, Path(report_dir or Path.cwd())), speed=speed)
    return verifier.empty_report().with_artifact(measured), measured.name


def load_artifact(path: Path, reference_spec: ModelSpec, options: LoadOptions) -> CausalLM:
    """The artifact's whole model, checked to predict over the reference's vocabulary."""
    model = artifact_plugin(path).open(path, reference_spec, options).load()
    if model.spec.vocab_size != reference_spec.vocab_size or model.spec.hidden_size != reference_spec.hidden_size:
        raise CpmkitError(f"{path}: vocabulary {model.spec.vocab_size} / hidden size {model.spec.hidden_size} "
                          f"differ from the reference's {reference_spec.vocab_size} / {reference_spec.hidden_size}; "
                          "it was not converted from this checkpoint")
    return model


def write_report_files(report: Report, folder: str | Path) -> Path:
    """``report.json``, ``report.md`` and ``report.html`` in ``folder`` (created), each written atomically;
    returns the HTML page's path."""
    folder = Path(folder)
    write_report(report, folder / "report.json")
    for name, text in (("report.md", write_markdown(report)), ("report.html", write_html(report))):
        with atomic_file(folder / name, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return folder / "report.html"
