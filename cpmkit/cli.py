"""The ``cpmkit`` command line. Commands parse options and call one library function each; a
``CpmkitError`` becomes one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
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


@cli.command(help="Show what a checkpoint is and which formats it can become, or what a GGUF file holds. "
                  f"PATH: {PATH_HELP}, or a .gguf file.")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout and nothing else")
@click.option("--no-scan", is_flag=True, help="skip reading the weights (no ternary detection)")
@click.option("--allow-nonfinite", is_flag=True, help="go on when a weight holds NaN or Inf")
def inspect(path: str, as_json: bool, no_scan: bool, allow_nonfinite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.convert.gguf import describe_gguf, format_gguf_text
    from cpmkit.formats.gguf.file import is_gguf_file
    from cpmkit.inspection import describe, format_text

    if is_gguf_file(path):
        info, text = describe_gguf(path), format_gguf_text
    else:
        ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
        info = describe(ck, scan=not no_scan, progress=_progress("scanning", len(ck.tensors)))
        text = format_text
    click.echo(json.dumps(info, indent=2) if as_json else text(info))


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
    from cpmkit.models.text import load_text
    from cpmkit.verify.evaluate import evaluate_text

    ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
    text = load_text(text_file, dataset)
    start = time.perf_counter()
    result = evaluate_text(ck, text, ctx=ctx, max_chunks=chunks, batch=batch,
                           progress=_progress("loading", len(ck.tensors)))
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"path": str(ck.root), **dataclasses.asdict(result), "seconds": round(seconds, 3)},
                              indent=2))
    else:
        click.echo(f"{ck.root}: PPL = {result.ppl:.4f} +/- {result.ppl_uncertainty:.4f} "
                   f"({result.n_tokens} tokens scored in {result.n_chunks} windows of {result.ctx}, "
                   f"{seconds:.1f} s)")


# ---- convert and imatrix --------------------------------------------------------------------------------

@cli.command(help="Convert a checkpoint into a GGUF file (--to gguf, in one streaming pass: llama.cpp's converter "
                  "and llama-quantize in one) or an mlx-lm folder (--to mlx). Written under a temporary name and "
                  f"renamed when complete. PATH: {PATH_HELP}.")
@click.argument("path")
@click.argument("out", type=click.Path())
@click.option("--to", "target", type=click.Choice(["gguf", "mlx"]), required=True, help="the artifact format")
@click.option("--type", "file_type", default="Q4_K_M", show_default=True,
              help="gguf: file type (F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q3_K_M, Q2_K, Q5_1, "
                   "Q5_0, Q4_1, Q4_0, TQ2_0, TQ1_0)")
@click.option("--imatrix", "imatrix_file", type=click.Path(dir_okay=False),
              help="gguf: an importance matrix (llama.cpp's GGUF or legacy .dat format)")
@click.option("--calib", "calib_file", type=click.Path(dir_okay=False),
              help="gguf: compute the importance matrix from this text first (saved as OUT.imatrix.gguf)")
@click.option("--calib-ctx", default=512, show_default=True, help="gguf: tokens per calibration window")
@click.option("--calib-chunks", type=int, help="gguf: at most this many calibration windows")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="gguf: quantize tensors whose GGUF name matches REGEX as TYPE (repeatable, first match wins)")
@click.option("--allow-scale-mismatch", is_flag=True,
              help="gguf: write MiniCPM3 even though its muP scales differ from what llama.cpp hard-codes")
@click.option("--bits", default=4, show_default=True, help="mlx: bits per weight (2, 3, 4, 5, 6, 8)")
@click.option("--group-size", default=64, show_default=True, help="mlx: weights per scale (32, 64, 128)")
@click.option("--recipe", help="mlx: mixed-precision recipe (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6)")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="mlx: dtype of the float tensors and scales (default: the checkpoint's)")
@click.option("--no-quantize", is_flag=True, help="mlx: write the weights unquantized")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--allow-nonfinite", is_flag=True, help="go on when a weight holds NaN or Inf")
def convert(path: str, out: str, target: str, file_type: str, imatrix_file: str | None, calib_file: str | None,
            calib_ctx: int, calib_chunks: int | None, tensor_types: tuple[str, ...], allow_scale_mismatch: bool,
            bits: int, group_size: int, recipe: str | None, dtype: str | None, no_quantize: bool, overwrite: bool,
            allow_nonfinite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint

    ck = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
    progress = _progress("converting", len(ck.tensors))
    if target == "mlx":
        from cpmkit.convert.mlx import convert_to_mlx

        written = convert_to_mlx(ck, Path(out), bits=bits, group_size=group_size, recipe=recipe, dtype=dtype,
                                 quantize=not no_quantize, overwrite=overwrite, progress=progress)
    else:
        from cpmkit.convert.gguf import convert_to_gguf

        imatrix_out = Path(out).with_name(Path(out).name + ".imatrix.gguf")
        imatrix = _imatrix(ck, imatrix_file, calib_file, imatrix_out, calib_ctx, calib_chunks, overwrite)
        written = convert_to_gguf(ck, Path(out), file_type=file_type, imatrix=imatrix, tensor_types=tensor_types,
                                  overwrite=overwrite, progress=progress, allow_scale_mismatch=allow_scale_mismatch)
    click.echo(str(written))


def _imatrix(ck, imatrix_file: str | None, calib_file: str | None, save_to: Path, ctx: int, chunks: int | None,
             overwrite: bool):
    """The importance matrix --imatrix names, or one computed from --calib and saved as ``save_to``."""
    if imatrix_file and calib_file:
        raise CpmkitError("give either --imatrix or --calib, not both")
    if imatrix_file:
        from cpmkit.formats.gguf.imatrix import read_imatrix

        return read_imatrix(imatrix_file)
    if calib_file:
        from cpmkit.convert.gguf_imatrix import compute_gguf_imatrix, save_gguf_imatrix
        from cpmkit.models.text import load_text

        imatrix = compute_gguf_imatrix(ck, load_text(calib_file), ctx=ctx, max_chunks=chunks,
                                       dataset=Path(calib_file).name, progress=_progress("calibrating"))
        return save_gguf_imatrix(imatrix, save_to, overwrite=overwrite)
    return None


@cli.command(name="imatrix", help="Compute llama.cpp's importance matrix (sum of squared activations per input "
                                  "column of every linear, per expert for MoE) with cpmkit's reference model, and "
                                  f"write it in llama.cpp's imatrix GGUF format. PATH: {PATH_HELP}.")
@click.argument("path")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--calib", "calib_file", type=click.Path(dir_okay=False), required=True,
              help="calibration text (UTF-8)")
@click.option("--ctx", default=512, show_default=True, help="tokens per window")
@click.option("--chunks", type=int, help="at most this many windows")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def imatrix_(path: str, out: str, calib_file: str, ctx: int, chunks: int | None, overwrite: bool) -> None:
    from cpmkit.checkpoint import Checkpoint

    written = _imatrix(Checkpoint.open(path), None, calib_file, Path(out), ctx, chunks, overwrite)
    click.echo(written.path)


# ---- verify and release ----------------------------------------------------------------------------------

def _stage_progress(description: str):
    def wrap(items):
        return tqdm(items, desc=description, leave=False, file=sys.stderr, disable=not sys.stderr.isatty())

    return wrap


@cli.command(help="Measure an artifact (a GGUF file or an MLX folder) against its BF16 reference on the same "
                  "tokens: perplexity, KL divergence, top-1 agreement, size, bits per weight and speed.")
@click.argument("artifact")
@click.option("--reference", required=True, help=f"the checkpoint it was made from: {PATH_HELP}")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="score on this UTF-8 text file "
              "(default: the built-in text)")
@click.option("--dataset", help="score on a named dataset (wikitext2; needs a network and `datasets`)")
@click.option("--ctx", default=512, show_default=True, help="tokens per window")
@click.option("--chunks", type=int, help="score at most this many windows")
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
                                progress=_stage_progress)
    html = write_report_files(report, report_dir) if report_dir is not None else None
    if as_json:
        click.echo(report.to_json(), nl=False)
        return
    click.echo(write_markdown(report), nl=False)
    if html is not None:
        click.echo(f"HTML report: {html}")


@cli.command(name="release", help="Make a shelf of quantized artifacts of a checkpoint, each verified against "
                                  "the reference, in Hugging Face hub layout (one folder per artifact, "
                                  f"manifest.json, report.json/.md/.html). PATH: {PATH_HELP}.")
@click.argument("path")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--to", "targets", multiple=True, metavar="FORMAT:VARIANT",
              help="an artifact to make, repeatable: gguf:Q8_0, gguf:Q4_K_M, gguf:Q2_K, mlx:8-g32, mlx:4, "
                   "mlx:mixed_4_6, ...")
@click.option("--recipe", help="a release TOML file (targets and options), or a built-in recipe: demo")
@click.option("--name", help="base of folder and repo names (default: the model's name)")
@click.option("--base-model", help="Hub id for the cards' base_model (default: the source's)")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="verify on this UTF-8 text file")
@click.option("--dataset", help="verify on a named dataset (wikitext2)")
@click.option("--ctx", type=int, help="tokens per window  [default: 512]")
@click.option("--chunks", type=int, help="score at most this many windows")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--speed/--no-speed", default=None, help="measure speed  [default: on]")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="where reference log-probs are kept (default: ~/.cache/cpmkit/reference)")
@click.option("--push", metavar="ORG[/NAME]", help="upload every artifact folder to ORG/<folder name> "
              "(needs huggingface_hub, a token and a network; checked before anything is written)")
def release_(path: str, outdir: str, targets: tuple[str, ...], recipe: str | None, name: str | None,
             base_model: str | None, text_file: str | None, dataset: str | None, ctx: int | None,
             chunks: int | None, device: str | None, speed: bool | None, cache_dir: str | None,
             push: str | None) -> None:
    from cpmkit.convert.release import release

    result = release(path, outdir, targets=targets, recipe=recipe, name=name, base_model=base_model, text=text_file,
                     dataset=dataset, ctx=ctx, chunks=chunks, device=device, speed=speed, cache_dir=cache_dir,
                     push=push, progress=_stage_progress)
    for a, measured in zip(result.artifacts, result.report.artifacts):
        pushed = f"  https://huggingface.co/{a.repo_id}" if a.repo_id else ""
        click.echo(f"{a.status.value:<10} {a.name:<20} dPPL {measured.delta_ppl_pct:+7.2f} %  "
                   f"KLD {measured.kld.mean:.6f}  {a.folder}{pushed}")
    click.echo(f"HTML report: {result.html}")


def main() -> None:
    cli(prog_name="cpmkit")
