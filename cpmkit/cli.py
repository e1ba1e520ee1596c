"""The ``cpmkit`` command line. Commands parse options and call one library function each; a
``CpmkitError`` becomes one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import click
from tqdm import tqdm

from cpmkit.errors import CpmkitError

PATH_HELP = "a checkpoint folder, a Hugging Face repo id, or `demo` for the built-in model"


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CpmkitError as e:
            raise click.ClickException(str(e)) from None


def _progress(desc: str, total: int | None = None):
    def wrap(items):
        return tqdm(items, desc=desc, total=total, unit="tensor", leave=False, file=sys.stderr,
                    disable=not sys.stderr.isatty())

    return wrap


def _emit_json(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(payload, indent=2))


@click.group(cls=_Cli)
@click.version_option(package_name="cpmkit")
def cli() -> None:
    """Convert, quantize and verify OpenBMB MiniCPM checkpoints."""


@cli.command(help=f"Show what a checkpoint is and which formats it can become. PATH: {PATH_HELP}.")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout and nothing else")
@click.option("--no-scan", is_flag=True, help="skip reading the weights (no ternary detection)")
@click.option("--allow-nonfinite", is_flag=True, help="go on when a weight holds NaN or Inf")
def inspect(path: str, as_json: bool, no_scan: bool, allow_nonfinite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.inspection import describe, format_text

    ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
    info = describe(ck, scan=not no_scan, progress=_progress("scanning", len(ck.tensors)))
    if as_json:
        _emit_json(info)
    else:
        click.echo(format_text(info))


@cli.command(name="eval", help="Perplexity of the BF16 reference, computed as llama-perplexity does. "
                                f"PATH: {PATH_HELP}.")
@click.argument("path")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="evaluate on this UTF-8 text file")
@click.option("--dataset", help="evaluate on a named dataset (wikitext2; needs a network and `datasets`)")
@click.option("--ctx", default=512, show_default=True, help="tokens per window")
@click.option("--chunks", type=int, help="evaluate at most this many windows")
@click.option("--batch", default=1, show_default=True, help="windows per forward pass")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout and nothing else")
@click.option("--allow-nonfinite", is_flag=True, help="go on when a weight holds NaN or Inf")
def eval_(path: str, text_file: str | None, dataset: str | None, ctx: int, chunks: int | None, batch: int,
          as_json: bool, allow_nonfinite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.verify.reference import evaluate_text
    from cpmkit.verify.text import load_text

    ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
    text = load_text(text_file, dataset)
    start = time.perf_counter()
    result = evaluate_text(ck, text, ctx=ctx, max_chunks=chunks, batch=batch,
                           progress=_progress("loading", len(ck.tensors)))
    seconds = time.perf_counter() - start
    if as_json:
        _emit_json({"path": str(ck.root), **dataclasses.asdict(result), "seconds": round(seconds, 3)})
    else:
        click.echo(f"{ck.root}: PPL = {result.ppl:.4f} +/- {result.ppl_uncertainty:.4f} "
                   f"({result.n_tokens} tokens scored in {result.n_chunks} windows of {result.ctx}, "
                   f"{seconds:.1f} s)")


def main() -> None:
    cli(prog_name="cpmkit")
