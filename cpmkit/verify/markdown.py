"""The report as a Markdown table for a model card, and the table model the HTML page shares.

A cell is a sequence of parts; a part that shows a number names the report field it comes from (a dotted path
inside the artifact, or inside ``reference`` / ``reference_metrics`` for the reference row) and carries the
exact value, so the HTML page can expose every shown number to a machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cpmkit.verify.report import DTYPE_BITS, Artifact, Device, Dtype, Report

DASH = "—"
NOISY_MARK = " ⚠"  # after a speed measured on a machine too busy to trust it


# ---- number formats, one per kind of quantity ------------------------------------------------------------

def format_bytes(n: float) -> str:
    """Decimal units, three significant digits: 812 MB, 1.62 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 999.5:
            return f"{n:.0f} {unit}" if unit == "B" else f"{_three_digits(n)} {unit}"
        n /= 1000
    return f"{_three_digits(n)} TB"


def format_count(n: int) -> str:
    """Parameter counts: 125 M, 8.19 B."""
    return f"{_three_digits(n / 1e6)} M" if n < 999.5e6 else f"{_three_digits(n / 1e9)} B"


def _three_digits(v: float) -> str:
    return f"{v:.2f}" if v < 9.995 else f"{v:.1f}" if v < 99.95 else f"{v:.0f}"


def format_bpw(v: float) -> str:
    return f"{v:.2f}"


def format_ppl(v: float) -> str:
    return f"{v:.3f}"


def format_delta_pct(v: float) -> str:
    return f"{v:+.2f}"


def format_kld(v: float) -> str:
    return f"{v:.6f}"  # llama-perplexity prints KLD with six decimals


def format_fraction_pct(v: float) -> str:
    return f"{100 * v:.2f}"


def format_rate(v: float) -> str:
    """Tokens per second: whole numbers from 100 up, one decimal below."""
    return f"{v:,.0f}" if v >= 99.95 else f"{v:.1f}"


def format_ratio(v: float) -> str:
    return f"{v:.2f}×"


def format_int(n: int) -> str:
    return f"{n:,}"


def device_label(d: Device) -> str:
    return f"{_enum_text(d.type)} ({d.name}, {_enum_text(d.kernel_path)} kernels)"


def _enum_text(v: Enum | str) -> str:
    return v.value if isinstance(v, Enum) else v


# ---- the table model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    text: str
    # dotted path of the report field shown, or one of DERIVED_FIELDS; None for plain text
    field: str | None = None
    value: float | int | None = None


# Shown numbers that are functions of report fields rather than fields themselves
DERIVED_FIELDS = {
    "reference.dtype_bits": "bits of reference.dtype (16 for bfloat16)",
    "speed.end_to_end.prefill_speedup": "prefill_tok_s / bf16_prefill_tok_s",
    "speed.end_to_end.decode_speedup": "decode_tok_s / bf16_decode_tok_s",
}


Cell = tuple[Part, ...]


@dataclass(frozen=True)
class Row:
    key: str  # "reference" or the artifact's name
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool
    artifact: Callable[[Artifact], Cell]
    reference: Callable[[Report], Cell]


def _num(text: str, field: str, value: float | int) -> Cell:
    return (Part(text, field, value),)


def _text(text: str) -> Cell:
    return (Part(text),)


def _ppl(ppl: float, unc: float, prefix: str) -> Cell:
    return (Part(format_ppl(ppl), f"{prefix}ppl", ppl), Part(" ± "),
            Part(format_ppl(unc), f"{prefix}ppl_uncertainty", unc))


def _throughput(a: Artifact, stage: str) -> Cell:
    e2e = a.speed.end_to_end if a.speed is not None else None
    if e2e is None:
        return _text(DASH)
    rate, bf16 = getattr(e2e, f"{stage}_tok_s"), getattr(e2e, f"bf16_{stage}_tok_s")
    return (Part(format_rate(rate), f"speed.end_to_end.{stage}_tok_s", rate), Part(" ("),
            Part(format_ratio(rate / bf16), f"speed.end_to_end.{stage}_speedup", rate / bf16),
            Part(f"){NOISY_MARK}" if e2e.noisy else ")"))


def _gate(a: Artifact) -> Cell:
    if a.gate is None:
        return _text(DASH)
    return _text("pass" if a.gate.passed else "FAILED: " + "; ".join(a.gate.misses))


def _reference_bpw(r: Report) -> Cell:
    bits = DTYPE_BITS[Dtype(r.reference.dtype)]
    return _num(format_bpw(bits), "reference.dtype_bits", bits)


COLUMNS: tuple[Column, ...] = (
    Column("Format", False, lambda a: _text(a.format), lambda r: _text("safetensors")),
    Column("Variant", False, lambda a: _text(a.variant),
           lambda r: _text(f"{_enum_text(r.reference.dtype)} reference")),
    Column("Size", True, lambda a: _num(format_bytes(a.file_size_bytes), "file_size_bytes", a.file_size_bytes),
           lambda r: _num(format_bytes(r.reference.file_size_bytes), "reference.file_size_bytes",
                          r.reference.file_size_bytes)),
    Column("Bits/weight", True, lambda a: _num(format_bpw(a.bits_per_weight), "bits_per_weight", a.bits_per_weight),
           _reference_bpw),
    Column("PPL", True, lambda a: _ppl(a.ppl, a.ppl_uncertainty, ""),
           lambda r: _ppl(r.reference_metrics.ppl, r.reference_metrics.ppl_uncertainty, "reference_metrics.")),
    Column("ΔPPL %", True, lambda a: _num(format_delta_pct(a.delta_ppl_pct), "delta_ppl_pct", a.delta_ppl_pct),
           lambda r: _text(DASH)),
    Column("Mean KLD", True, lambda a: _num(format_kld(a.kld.mean), "kld.mean", a.kld.mean), lambda r: _text(DASH)),
    Column("P99 KLD", True, lambda a: _num(format_kld(a.kld.p99), "kld.p99", a.kld.p99), lambda r: _text(DASH)),
    Column("Top-1 %", True,
           lambda a: _num(format_fraction_pct(a.top1_agreement), "top1_agreement", a.top1_agreement),
           lambda r: _text(DASH)),
    Column("Prefill tok/s", True, lambda a: _throughput(a, "prefill"), lambda r: _text(DASH)),
    Column("Decode tok/s", True, lambda a: _throughput(a, "decode"), lambda r: _text(DASH)),
)
GATE_COLUMN = Column("Gate", False, _gate, lambda r: _text(DASH))


def columns(report: Report) -> tuple[Column, ...]:
    """The table's columns: a Gate column when a release held some artifact to quality gates."""
    return COLUMNS + (GATE_COLUMN,) if any(a.gate is not None for a in report.artifacts) else COLUMNS


def table_rows(report: Report) -> list[Row]:
    """The reference row, then one row per artifact in report order."""
    shown = columns(report)
    rows = [Row("reference", tuple(c.reference(report) for c in shown))]
    rows += [Row(a.name, tuple(c.artifact(a) for c in shown)) for a in report.artifacts]
    return rows


def summary_line(report: Report) -> str:
    ev, ref = report.evaluation, report.reference
    return (f"Reference {ref.source} ({ref.architecture}, {format_count(ref.parameter_count)} parameters, "
            f"{_enum_text(ref.dtype)}). Scored on {ev.text_source} text (sha256 {ev.text_sha256[:12]}), "
            f"ctx {ev.ctx}, {format_int(ev.windows)} windows, {format_int(ev.scored_tokens)} scored tokens, "
            f"on {device_label(report.device)}.")


def notes_lines(report: Report) -> list[str]:
    lines = ["ΔPPL and KLD (nats) are against the reference on the same tokens; top-1 is the share of tokens "
             "where both models' most likely next token agrees."]
    timed = [a for a in report.artifacts if a.speed is not None and a.speed.end_to_end is not None]
    if timed:
        by_device: dict[str, list[str]] = {}
        for a in timed:
            by_device.setdefault(device_label(a.speed.device), []).append(a.name)
        where = "; ".join(f"{dev}: {', '.join(names)}" if len(by_device) > 1 else dev
                          for dev, names in by_device.items())
        lengths = {(a.speed.end_to_end.prefill_tokens, a.speed.end_to_end.decode_tokens) for a in timed}
        prompt, generated = min(lengths)
        shape = (f"one sequence ({prompt}-token prompt, {generated} generated tokens)" if len(lengths) == 1
                 else "one sequence")
        lines.append(f"Speed: tokens/s for {shape}, on {where}; (n×) is the speedup over BF16 on the same device.")
    noisy = [a.name for a in report.artifacts if a.speed is not None
             and (any(lin.noisy for lin in a.speed.linears) or (a.speed.end_to_end and a.speed.end_to_end.noisy))]
    if noisy:
        lines.append(f"{NOISY_MARK.strip()} Speed of {', '.join(noisy)} was measured while the machine was busy "
                     "(repeated timings spread by more than 25 %): do not trust those numbers.")
    failed = [a.name for a in report.artifacts if a.gate is not None and not a.gate.passed]
    if failed:
        lines.append(f"Missed their quality gates (not published): {', '.join(failed)}.")
    return lines


# ---- Markdown --------------------------------------------------------------------------------------------

def cell_text(cell: Cell) -> str:
    return "".join(p.text for p in cell)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def write_markdown(report: Report) -> str:
    """A summary line, a table (reference row first) and notes, ready to paste into a model card."""
    report.validate()
    shown = columns(report)
    header = "| " + " | ".join(c.header for c in shown) + " |"
    rule = "|" + "|".join("---:" if c.numeric else "---" for c in shown) + "|"
    body = ["| " + " | ".join(_md_escape(cell_text(cell)) for cell in row.cells) + " |"
            for row in table_rows(report)]
    notes = [f"_{line}_" for line in notes_lines(report)]
    return "\n".join([summary_line(report), "", header, rule, *body, "", *notes]) + "\n"
