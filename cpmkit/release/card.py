"""The model card (README.md) of one released artifact: Hugging Face front matter, the verification table
(reference row and this artifact), the files with their checksums, how to run it, how to remake it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpmkit import __version__
from cpmkit.convert.plugin import Location, Target
from cpmkit.convert.registry import FORMATS
from cpmkit.verify.markdown import format_bytes, write_markdown
from cpmkit.verify.report import Report

QUANTIZED_BY = "cpmkit"
BASE_MODEL_RELATION = "quantized"


@dataclass(frozen=True)
class CardFacts:
    """What every card of a release shares."""

    family: str
    base_model: str | None
    license_keys: dict[str, str]  # license, license_name, license_link from the source card or config


def front_matter(target: Target, facts: CardFacts) -> list[str]:
    fmt = FORMATS[target.format]
    lines = ["---"]
    if facts.base_model:
        lines.append(f"base_model: {facts.base_model}")
    lines.append(f"base_model_relation: {BASE_MODEL_RELATION}")
    lines += [f"{key}: {value}" for key, value in facts.license_keys.items()]
    if fmt.library_name:
        lines.append(f"library_name: {fmt.library_name}")
    lines.append("pipeline_tag: text-generation")
    lines.append(f"quantized_by: {QUANTIZED_BY}")
    tags = dict.fromkeys((*fmt.tags, facts.family, "minicpm", "quantized", target.variant, QUANTIZED_BY))
    lines += ["tags:", *(f"- {tag}" for tag in tags), "---"]
    return lines


def model_card(target: Target, title: str, report: Report, files: list[dict[str, Any]], where: Location,
               facts: CardFacts, config: dict[str, Any], remake: str) -> str:
    """``report``: the reference and this one artifact (its ``verify.json``); ``remake``: the command that
    makes this artifact again."""
    fmt = FORMATS[target.format]
    artifact = report.artifacts[0]
    base = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else "the model"
    rows = [f"| `{f['path']}` | {format_bytes(f['size_bytes'])} | `{f['sha256']}` |" for f in files]
    body = [
        f"# {title}",
        "",
        f"{fmt.suffix} `{target.variant}` of {base}, made with cpmkit {__version__} and verified against the "
        f"{report.reference.dtype.value} reference: ΔPPL {artifact.delta_ppl_pct:+.2f} %, mean KLD "
        f"{artifact.kld.mean:.6f}, top-1 agreement {100 * artifact.top1_agreement:.2f} %.",
        "",
        "## Verification",
        "",
        write_markdown(report).rstrip(),
        "",
        "The full measurements (KLD histogram, per-linear speed) are in `verify.json` "
        "(schema `cpmkit.verify/1`).",
        "",
        "## Files",
        "",
        "| File | Size | SHA-256 |",
        "|---|---:|---|",
        *rows,
        "",
        "`sha256sum -c SHA256SUMS` checks them.",
        "",
        fmt.usage(target, where, config).strip(),
        "",
        "## Remake it",
        "",
        "```bash",
        f"pip install cpmkit=={__version__}",
        remake,
        "```",
        "",
        "The same checkpoint, options and cpmkit version give byte-identical files.",
    ]
    return "\n".join(front_matter(target, facts)) + "\n\n" + "\n".join(body) + "\n"
