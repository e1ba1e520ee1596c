"""``cpmkit verify``: score artifacts against their BF16 reference on the same tokens, on one device.

A :class:`Verifier` holds one reference checkpoint, one evaluation text cut into llama-perplexity's windows,
and one device. Every model (the reference, then each artifact) runs through the layer-streamed runner
(``cpmkit.models.streamed``): one part in memory at a time, its weights in their stored dtype (bf16, or the
artifact's quantized bytes), so an 8B model verifies on a 24 GB machine, or on a GPU smaller than the model.
Activations are float32 on CPU and bf16 on CUDA, as a deployment runs them (the kernels and cuBLAS accumulate
in float32); log-probs are float32. The reference's log-probabilities at the scored positions are computed once
and kept on disk under a key of everything they depend on (the reference weights' SHA-256, the window token
ids, ctx, the device type and activation dtype, cpmkit's version), written and read one window at a time
(``logprob_cache``), so verifying a shelf of artifacts, or verifying again later, runs the reference once.
Each artifact then gets perplexity, KL divergence from the reference (mean, p99, max, histogram), top-1
agreement, its size and bits per weight, and optionally its speed.

On CPU, the quantized linears of a block keep their dequantized float32 weights for the block's pass when
that is small (``CACHE_BLOCK_BYTES``), else dequantize a row chunk at a time; speed is measured without
that cache, in BF16 activations, which is what the CPU path costs per call. On CUDA both run cpmkit's
Triton dequant-GEMM kernels. End-to-end decode speed needs the whole model resident and is skipped (null in
the report, said on stderr) when it would not fit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from cpmkit import __version__
from cpmkit.atomic import atomic_file
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.plugin import LoadOptions
from cpmkit.convert.registry import artifact_plugin
from cpmkit.errors import CpmkitError
from cpmkit.kernels import Backend
from cpmkit.models.reference import checkpoint_source
from cpmkit.models.source import ModelSource
from cpmkit.models.streamed import StreamedRunner
from cpmkit.models.windows import make_windows
from cpmkit.tokenizer import Tokenizer
from cpmkit.verify import speed as speed_
from cpmkit.verify.html import write_html
from cpmkit.verify.logprob_cache import LogprobFile, write_logprobs
from cpmkit.verify.markdown import write_markdown
from cpmkit.verify.perplexity import (
    Divergence,
    DivergenceAccumulator,
    Perplexity,
    nll_of,
    summarize_nll,
)
from cpmkit.verify.report import (
    NOISY_SPREAD,
    Artifact,
    EndToEnd,
    Evaluation,
    Kld,
    KldHistogram,
    ReferenceMetrics,
    Report,
    Speed,
    delta_ppl_pct,
    write_report,
)
from cpmkit.verify.setup import (
    EvalText,
    default_cache_dir,
    describe_reference,
    fits_in_memory,
    report_device,
    resolve_device,
    score_dtype,
)

ProgressFactory = Callable[[str, str], Callable[[Iterable], Iterable]]  # (description, unit) -> wrapper
CPU_SCORING_NOTE = "dequantized weights cached per block for scoring"
CPU_SPEED_NOTE = "dequantize + matmul on every call"
CUDA_SCORING_NOTE = "bf16 activations, float32 accumulation"
CUDA_SPEED_NOTE = "bf16 activations; each decode step one CUDA-graph replay"


def no_progress(description: str, unit: str) -> Callable[[Iterable], Iterable]:
    return iter


def path_in_report(artifact: Path, report_dir: Path) -> str:
    """The artifact as the report names it: relative to the report's folder when inside it, else by name."""
    try:
        return artifact.resolve().relative_to(report_dir.resolve()).as_posix() or "."
    except ValueError:
        return artifact.name


class Verifier:
    """Artifacts of one reference, scored on one text and device; see the module docstring."""

    def __init__(self, ck: Checkpoint, source: str, text: EvalText, *, ctx: int = 512, chunks: int | None = None,
                 device: str = "auto", cache_dir: str | Path | None = None, progress: ProgressFactory = no_progress,
                 log: Callable[[str], None] = lambda line: None):
        self.ck = ck
        self.device = resolve_device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.progress, self.log = progress, log
        tok = Tokenizer(ck.root, ck.config)
        self.windows = make_windows(tok.encode(text.text), ctx, tok.special.bos_id if tok.special.add_bos else None,
                                    chunks)
        self.reference = describe_reference(ck, source)
        self.evaluation = Evaluation(text.source, hashlib.sha256(text.text.encode("utf-8")).hexdigest(), ctx,
                                     self.windows.tokens.shape[0], self.windows.n_scored)
        self.score_dtype = score_dtype(self.device)
        self.scoring_device = report_device(self.device, CPU_SCORING_NOTE, CUDA_SCORING_NOTE)
        self.speed_device = report_device(self.device, CPU_SPEED_NOTE, CUDA_SPEED_NOTE)
        self._reference_file: LogprobFile | None = None
        self._reference_metrics: ReferenceMetrics | None = None
        self._decode_tokens: int | None = None
        self._bf16_timings: tuple[speed_.Timing, speed_.Timing] | None = None  # BF16 prefill and decode step

    # ---- the reference -----------------------------------------------------------------------------------

    @property
    def cache_key(self) -> str:
        parts = {"cpmkit": __version__, "weights": self.reference.content_sha256, "ctx": self.windows.ctx,
                 "windows": hashlib.sha256(self.windows.tokens.numpy().astype("<i8").tobytes()).hexdigest(),
                 "device": self.device.type, "dtype": str(self.score_dtype)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @property
    def cache_file(self) -> Path:
        return self.cache_dir / f"{self.cache_key}.npy"

    @property
    def _cache_shape(self) -> tuple[int, int, int]:
        return (*self.windows.targets.shape, self.ck.spec.vocab_size)

    def reference_logprobs(self) -> LogprobFile:
        """The reference's log-probs, float32 [windows, scored positions, vocab], read a window at a time: from
        the disk cache, else computed (streamed) and stored there."""
        if self._reference_file is None:
            path = self.cache_file
            if not LogprobFile.valid(path, self._cache_shape):
                source = checkpoint_source(self.ck, self.score_dtype)
                write_logprobs(path, self._cache_shape, self._logprobs(source, "scoring reference"))
            self._reference_file = LogprobFile(path)
        return self._reference_file

    def _logprobs(self, source: ModelSource, description: str) -> Iterable[torch.Tensor]:
        """Log-probs at the scored positions of every window, [1, positions, V] float32, in order."""
        runner = StreamedRunner(source, self.device, progress=self.progress(f"{description}", "part"))
        scored = slice(self.windows.first_scored, -1)
        for logits in runner.logits(self.windows.tokens, scored):
            yield torch.log_softmax(logits, dim=-1)

    def _window_logprobs(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        """The reference's log-probs of window ``i``, [1, scored positions, vocab]."""
        return self.reference_logprobs().window(i).to(device or self.device)

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

    def open_artifact(self, path: Path, options: LoadOptions) -> ModelSource:
        """The artifact's model, read lazily, checked to predict over the reference's vocabulary."""
        source = artifact_plugin(path).open(path, self.ck.spec, options)
        ours, theirs = source.spec, self.ck.spec
        if ours.vocab_size != theirs.vocab_size or ours.hidden_size != theirs.hidden_size:
            raise CpmkitError(f"{path}: vocabulary {ours.vocab_size} / hidden size {ours.hidden_size} differ from "
                              f"the reference's {theirs.vocab_size} / {theirs.hidden_size}; it was not converted "
                              "from this checkpoint")
        return source

    def measure(self, path: str | Path, *, report_path: str, variant: str | None = None,
                speed: bool = True) -> Artifact:
        """Score the artifact at ``path``; ``report_path`` is where the report will say it is, ``variant``
        overrides the variant read from the artifact (a release names its targets)."""
        path = Path(path)
        description = artifact_plugin(path).describe(path)
        for note in description.notes:
            self.log(f"{path}: {note}")
        variant = variant or description.variant
        source = self.open_artifact(path, LoadOptions(self.score_dtype, Backend.AUTO))
        self.reference_logprobs()  # before the artifact's pass, so the two never run at once
        ppl, divergence, histogram = self._score(source, f"scoring {description.format}:{variant}")
        return Artifact(
            name=f"{description.format}:{variant}", format=description.format, variant=variant, path=report_path,
            file_size_bytes=description.file_size_bytes,
            bits_per_weight=description.bits_per_weight(self.reference.parameter_count),
            ppl=ppl.ppl, ppl_uncertainty=ppl.ppl_uncertainty,
            delta_ppl_pct=delta_ppl_pct(ppl.ppl, self.reference_metrics().ppl),
            kld=Kld(divergence.kld_mean, divergence.kld_p99, divergence.kld_max),
            top1_agreement=divergence.top1_agreement, kld_histogram=histogram,
            speed=self._speed(path, description.tensor_bytes) if speed else None, gate=None)

    def _score(self, source: ModelSource, description: str) -> tuple[Perplexity, Divergence, KldHistogram]:
        targets = self.windows.targets.to(self.device)
        divergence = DivergenceAccumulator()
        nll = []
        for i, cand in enumerate(self._logprobs(source, description)):
            divergence.add(self._window_logprobs(i), cand)
            nll.append(nll_of(cand, targets[i : i + 1]).cpu())
        ppl = summarize_nll(torch.cat(nll).flatten(), self.windows)
        result = divergence.result()
        return ppl, result, KldHistogram.from_values(result.per_token_kld.numpy())

    def _speed(self, path: Path, artifact_bytes: int) -> Speed:
        source = self.open_artifact(path, LoadOptions(speed_.SPEED_DTYPE, Backend.AUTO))
        linears = speed_.linear_speeds(source, self.device)
        bf16_bytes = self.reference.parameter_count * speed_.SPEED_DTYPE.itemsize
        if not fits_in_memory(self.device, artifact_bytes + bf16_bytes):
            self.log(f"{path}: end-to-end speed skipped: the artifact and the BF16 model do not both fit in "
                     f"{self.device.type} memory")
            return Speed(self.speed_device, linears, None)
        model = source.load().to(self.device)
        prompt = self.windows.tokens[:1, : min(speed_.PREFILL_TOKENS, self.windows.ctx)].to(self.device)
        probed = speed_.decode_length(model, prompt)  # also warms the decode path up
        if self._decode_tokens is None:  # one length for the session, so every artifact and BF16 decode alike
            self._decode_tokens = probed
        prefill, decode = speed_.prefill(model, prompt), speed_.decode(model, prompt, self._decode_tokens)
        del model
        if self._bf16_timings is None:
            bf16 = checkpoint_source(self.ck, speed_.SPEED_DTYPE).load().to(self.device)
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
                    progress: ProgressFactory = no_progress,
                    log: Callable[[str], None] = lambda line: None) -> tuple[Report, str]:
    """Verify one artifact (a GGUF file, an MLX folder, ...) against the checkpoint ``reference`` (a folder, a
    Hugging Face repo id, or ``demo``) on ``text`` (a file; default the built-in text) or ``dataset``.

    Returns the report (the reference row and this artifact) and the artifact's name in it. ``report_dir``:
    the folder the report will be written to (the artifact's path in the report is relative to it; default
    the current folder). ``cache_dir``: where reference log-probs are kept (default
    :func:`default_cache_dir`). ``speed=False`` skips the speed measurements.
    """
    path = Path(artifact)
    plugin = artifact_plugin(path)  # a clear error before the reference is read
    ck = Checkpoint.open(reference)
    verifier = Verifier(ck, str(reference), EvalText.load(text, dataset), ctx=ctx, chunks=chunks, device=device,
                        cache_dir=cache_dir, progress=progress, log=log)
    verifier.open_artifact(path, LoadOptions())  # the artifact's own checks, before the reference pass
    plugin.describe(path)
    measured = verifier.measure(path, report_path=path_in_report(path, Path(report_dir or Path.cwd())), speed=speed)
    return verifier.empty_report().with_artifact(measured), measured.name


def write_report_files(report: Report, folder: str | Path) -> Path:
    """``report.json``, ``report.md`` and ``report.html`` in ``folder`` (created), each written atomically;
    returns the HTML page's path."""
    folder = Path(folder)
    write_report(report, folder / "report.json")
    for name, text in (("report.md", write_markdown(report)), ("report.html", write_html(report))):
        with atomic_file(folder / name, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return folder / "report.html"
