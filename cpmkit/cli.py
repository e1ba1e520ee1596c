"""The ``cpmkit`` command line. Commands parse options and call one library function each; a
``CpmkitError`` becomes one line on stderr and exit status 1, never a traceback. Format options come from the
format plug-ins (``cpmkit.convert.registry``): each is offered once, and refused for a format that does not
take it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from cpmkit.convert.plugin import Option
from cpmkit.convert.registry import FORMATS
from cpmkit.errors import CpmkitError

PATH_HELP = "a checkpoint folder, a Hugging Face repo id, or `demo` for the built-in model"
TARGET_HELP = "FORMAT[:VARIANT]: " + ", ".join(f"{p.name}:{p.default_variant}" for p in FORMATS.values()) + ", ..."


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CpmkitError as e:
            raise click.ClickException(str(e)) from None


def _log(line: str) -> None:
    click.echo(line, err=True)


def _progress(desc: str, unit: str = "it") -> Callable[[Iterable], Iterable]:
    """On a terminal: a bar with totals. Elsewhere (CI, a pipeline's log): a line when the stage starts and one
    when it ends, with its count and duration."""

    def wrap(items: Iterable) -> Iterable:
        if sys.stderr.isatty():
            from tqdm import tqdm

            yield from tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr)
            return
        start, count = time.perf_counter(), 0
        _log(f"{desc} ...")
        for item in items:
            count += 1
            yield item
        _log(f"{desc}: {count} {unit}{'s' if count != 1 else ''} in {time.perf_counter() - start:.1f} s")

    return wrap


def _format_options(command: Callable) -> Callable:
    """Add every registered format's options to ``command`` (one click option per name; the help says which
    formats take it)."""
    by_name: dict[str, list[tuple[str, Option]]] = {}
    for plugin in FORMATS.values():
        for option in plugin.options:
            by_name.setdefault(option.name, []).append((plugin.name, option))
    for name, entries in reversed(list(by_name.items())):
        option = entries[0][1]
        helps = dict.fromkeys(f"{fmt}: {o.help}" for fmt, o in entries)
        text = "; ".join(helps) if len({o.help for _, o in entries}) > 1 else \
            f"{', '.join(fmt for fmt, _ in entries)}: {option.help}"
        if option.kind is bool:
            decorator = click.option(option.flag, name, is_flag=True, flag_value=True, default=None, help=text)
        else:
            # each plug-in checks its own choices; the command line offers all of them
            choices = tuple(dict.fromkeys(c for _, o in entries for c in (o.choices or ())))
            kind = {int: int, float: float, Path: click.Path(),  # a file or a folder: the plug-in checks
                    str: click.Choice(choices) if choices else str}[option.kind]
            metavar = "REGEX=TYPE" if name == "tensor_type" else None
            decorator = click.option(option.flag, name, type=kind, multiple=option.multiple, help=text,
                                     metavar=metavar)
        command = decorator(command)
    return command


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The format options actually given (click reports an absent one as None, or () when repeatable)."""
    names = {o.name for p in FORMATS.values() for o in p.options}
    return {k: v for k, v in options.items() if k in names and v not in (None, ())}


@click.group(cls=_Cli)
@click.version_option(package_name="cpmkit")
@click.option("--threads", type=click.IntRange(min=1), envvar="CPMKIT_THREADS",
              help="CPU threads for torch, and GGUF quantizer processes (default: torch's own choice; 1 is "
                   "fastest for small models on a busy machine)")
def cli(threads: int | None) -> None:
    """Convert, quantize and verify OpenBMB MiniCPM checkpoints."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@cli.command(help="Show what a checkpoint is and which formats it can become, or what an artifact holds (a GGUF "
                  f"file, an MLX folder, ...). PATH: {PATH_HELP}, or an artifact.")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout and nothing else")
@click.option("--no-scan", is_flag=True, help="skip reading the weights (no ternary detection)")
@click.option("--allow-nonfinite", is_flag=True, help="report on a checkpoint whose weights hold NaN or Inf")
def inspect(path: str, as_json: bool, no_scan: bool, allow_nonfinite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.convert.registry import detect_artifact
    from cpmkit.inspection import describe, format_text

    plugin = detect_artifact(path) if Path(path).exists() else None
    if plugin is not None:
        info, text = plugin.inspect(Path(path)), plugin.format_inspect
    else:
        ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
        info = describe(ck, scan=not no_scan, progress=_progress("scanning", "tensor"))
        text = format_text
    click.echo(json.dumps(info, indent=2) if as_json else text(info))


@cli.command(name="eval", help="Perplexity of the BF16 reference, computed as llama-perplexity does. "
                                f"PATH: {PATH_HELP}.")
@click.argument("path")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="evaluate on this UTF-8 text file")
@click.option("--dataset", help="evaluate on a named dataset (wikitext2; needs a network and `datasets`)")
@click.option("--ctx", type=click.IntRange(min=4), default=512, show_default=True, help="tokens per window")
@click.option("--chunks", type=click.IntRange(min=1), help="evaluate at most this many windows")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="windows per forward pass")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout and nothing else")
@click.option("--allow-nonfinite", is_flag=True, help="evaluate even though a weight holds NaN or Inf")
def eval_(path: str, text_file: str | None, dataset: str | None, ctx: int, chunks: int | None, batch: int,
          as_json: bool, allow_nonfinite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.models.text import load_text
    from cpmkit.verify.evaluate import evaluate_text

    ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
    text = load_text(text_file, dataset)
    start = time.perf_counter()
    result = evaluate_text(ck, text, ctx=ctx, max_chunks=chunks, batch=batch,
                           progress=_progress("evaluating", "part"))
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"path": str(ck.root), **dataclasses.asdict(result), "seconds": round(seconds, 3)},
                              indent=2))
    else:
        click.echo(f"{ck.root}: PPL = {result.ppl:.4f} +/- {result.ppl_uncertainty:.4f} "
                   f"({result.n_tokens} tokens scored in {result.n_chunks} windows of {result.ctx}, "
                   f"{seconds:.1f} s)")


# ---- convert and imatrix --------------------------------------------------------------------------------

@cli.command(help="Convert a checkpoint into an artifact: --to gguf:Q4_K_M (llama.cpp's converter and "
                  "llama-quantize in one streaming pass), --to mlx:4bit-g64 (an mlx-lm folder), ... Written under "
                  f"a temporary name and renamed when complete. PATH: {PATH_HELP}.")
@click.argument("path")
@click.argument("out", type=click.Path())
@click.option("--to", "target", required=True, metavar="FORMAT[:VARIANT]", help=TARGET_HELP)
@_format_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="where calibration runs (formats that calibrate)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def convert(path: str, out: str, target: str, device: str, overwrite: bool, **options: Any) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.convert.plugin import ConvertContext, parse_target
    from cpmkit.device import resolve_device

    parsed = parse_target(target, _given(options))
    plugin = FORMATS[parsed.format]
    ck = Checkpoint.open(path)
    reason = plugin.why_not(ck.spec, parsed)
    if reason:
        raise CpmkitError(f"{ck.root}: cannot convert to {parsed.name}: {reason}")
    context = ConvertContext(overwrite=overwrite, progress=_progress(f"{parsed.name}: converting", "part"),
                             device=str(resolve_device(device)), log=_log)
    click.echo(str(plugin.convert(ck, parsed, Path(out), context)))


@cli.command(name="imatrix", help="Compute llama.cpp's importance matrix (sum of squared activations per input "
                                  "column of every linear, per expert for MoE) with cpmkit's reference model, and "
                                  f"write it in llama.cpp's imatrix GGUF format. PATH: {PATH_HELP}.")
@click.argument("path")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--calib", "calib_file", type=click.Path(dir_okay=False), required=True,
              help="calibration text (UTF-8)")
@click.option("--seqlen", type=click.IntRange(min=4), default=512, show_default=True, help="tokens per window")
@click.option("--nsamples", type=click.IntRange(min=1), help="at most this many windows, in order")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def imatrix_(path: str, out: str, calib_file: str, seqlen: int, nsamples: int | None, overwrite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.convert.gguf.imatrix import compute_gguf_imatrix, save_gguf_imatrix
    from cpmkit.models.text import load_text

    ck = Checkpoint.open(path)
    imatrix = compute_gguf_imatrix(ck, load_text(calib_file), ctx=seqlen, max_chunks=nsamples,
                                   dataset=Path(calib_file).name, progress=_progress("calibrating", "window"))
    click.echo(save_gguf_imatrix(imatrix, Path(out), overwrite=overwrite).path)


# ---- verify and release ----------------------------------------------------------------------------------

@cli.command(help="Measure an artifact (a GGUF file, an MLX folder, ...) against its BF16 reference on the same "
                  "tokens: perplexity, KL divergence, top-1 agreement, size, bits per weight and speed.")
@click.argument("artifact")
@click.option("--reference", required=True, help=f"the checkpoint it was made from: {PATH_HELP}")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="score on this UTF-8 text file "
              "(default: the built-in text)")
@click.option("--dataset", help="score on a named dataset (wikitext2; needs a network and `datasets`)")
@click.option("--ctx", type=click.IntRange(min=4), default=512, show_default=True, help="tokens per window")
@click.option("--chunks", type=click.IntRange(min=1), help="score at most this many windows")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object and nothing else")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="write report.json, report.md and report.html into this folder")
@click.option("--no-speed", is_flag=True, help="skip the speed measurements")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="where reference log-probs are kept (default: ~/.cache/cpmkit/reference)")
def verify(artifact: str, reference: str, text_file: str | None, dataset: str | None, ctx: int, chunks: int | None,
           device: str, as_json: bool, report_dir: str | None, no_speed: bool, cache_dir: str | None) -> None:
    from cpmkit.verify.markdown import write_markdown
    from cpmkit.verify.run import verify_artifact, write_report_files

    report, _ = verify_artifact(artifact, reference, text=text_file, dataset=dataset, ctx=ctx, chunks=chunks,
                                device=device, cache_dir=cache_dir, speed=not no_speed, report_dir=report_dir,
                                progress=_progress)
    html = write_report_files(report, report_dir) if report_dir is not None else None
    if as_json:
        click.echo(report.to_json(), nl=False)
        return
    click.echo(write_markdown(report), nl=False)
    if html is not None:
        click.echo(f"HTML report: {html}")


@cli.command(name="release", help="Make a shelf of quantized artifacts of a checkpoint, each verified against "
                                  "the reference and held to its quality gates, in Hugging Face hub layout (one "
                                  "folder per artifact, manifest.json, report.json/.md/.html). Exits non-zero "
                                  f"when an artifact misses its gates. PATH: {PATH_HELP}.")
@click.argument("path")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--to", "targets", multiple=True, metavar="FORMAT[:VARIANT]",
              help=f"an artifact to make, repeatable: {TARGET_HELP}")
@click.option("--recipe", help="a release TOML file (targets with their options and gates), or a built-in "
                               "recipe: demo")
@click.option("--name", help="base of folder and repo names (default: the model's name)")
@click.option("--base-model", help="Hub id for the cards' base_model (default: the source's, when it is a Hub repo)")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="verify on this UTF-8 text file")
@click.option("--dataset", help="verify on a named dataset (wikitext2)")
@click.option("--ctx", type=click.IntRange(min=4), help="tokens per window  [default: 512]")
@click.option("--chunks", type=click.IntRange(min=1), help="score at most this many windows")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--speed/--no-speed", default=None, help="measure speed  [default: on]")
@click.option("--max-kld", type=click.FloatRange(min=0), help="quality gate: largest mean KLD an artifact may have")
@click.option("--max-delta-ppl", type=click.FloatRange(min=0),
              help="quality gate: largest perplexity increase an artifact may have, in %")
@click.option("--prune", is_flag=True, help="remove folders an earlier release left in OUTDIR for other targets")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="where reference log-probs are kept (default: ~/.cache/cpmkit/reference)")
@click.option("--push", metavar="ORG[/NAME]", help="upload every artifact folder that passed its gates to "
              "ORG/<folder name> (needs huggingface_hub, a token and a network; checked before anything is "
              "written)")
def release_(path: str, outdir: str, targets: tuple[str, ...], recipe: str | None, name: str | None,
             base_model: str | None, text_file: str | None, dataset: str | None, ctx: int | None,
             chunks: int | None, device: str | None, speed: bool | None, max_kld: float | None,
             max_delta_ppl: float | None, prune: bool, cache_dir: str | None, push: str | None) -> None:
    from cpmkit.release.shelf import GateFailure, release

    try:
        result = release(path, outdir, targets=targets, recipe=recipe, name=name, base_model=base_model,
                         text=text_file, dataset=dataset, ctx=ctx, chunks=chunks, device=device, speed=speed,
                         cache_dir=cache_dir, push=push, max_kld=max_kld, max_delta_ppl=max_delta_ppl, prune=prune,
                         progress=_progress, log=_log)
    except GateFailure as failure:
        _print_shelf(failure.result)
        raise
    _print_shelf(result)


def _print_shelf(result) -> None:
    for a, measured in zip(result.artifacts, result.report.artifacts):
        pushed = f"  https://huggingface.co/{a.repo_id}" if a.repo_id else ""
        verdict = "" if a.passed else "  FAILED gates"
        click.echo(f"{a.status.value:<10} {a.name:<20} dPPL {measured.delta_ppl_pct:+7.2f} %  "
                   f"KLD {measured.kld.mean:.6f}  {a.folder}{pushed}{verdict}")
    click.echo(f"HTML report: {result.html}")


_interrupted = False


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C and SIGTERM: partial outputs are removed on the way out (click reports "Aborted!")."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # a user-facing warning, not a pointer into cpmkit's source


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    warnings.formatwarning = _one_line_warning
    try:
        cli(prog_name="cpmkit")
    except SystemExit as done:
        if not _interrupted:
            raise
        # interrupted: the outputs are cleaned up by now; leave without joining the threads of a worker pool that
        # may have been stopped half-way (its workers die with this process)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(done.code if isinstance(done.code, int) else 1)
