"""The report as one self-contained HTML page: the results table and plots drawn here as inline SVG.

No scripts, fonts, styles or images are loaded from anywhere; the page embeds the whole JSON document in
``<script type="application/json" id="cpmkit-report">`` and every number of the table also sits in its cell
as ``data-field`` / ``data-value`` (the field names of :mod:`cpmkit.verify.markdown`), so a machine can check
what a person reads. Colours are the Okabe-Ito palette, distinguishable with the common colour-vision
deficiencies; each artifact keeps one colour on every plot and in the table.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from enum import Enum

from cpmkit.verify.markdown import (
    Cell,
    columns,
    format_count,
    format_int,
    format_ppl,
    format_rate,
    format_ratio,
    notes_lines,
    table_rows,
)
from cpmkit.verify.report import Artifact, Report

# Okabe & Ito (2008), yellow last: it is faint on white
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
FORMAT_MARKERS = {"gguf": "circle", "mlx": "square"}
OTHER_MARKERS = ("diamond", "triangle")
BF16_GREY = "#9AA4AF"
# light to dark blue for batch sizes: ordered by luminance, so readable without colour vision
BATCH_SHADES = ("#9ECAE1", "#4292C6", "#08519C", "#08306B")
CHAR_WIDTH = 6.6  # px per character of 11-12 px text, for placing labels
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#eef1f4;--panel:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#fff;
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","DejaVu Sans",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:28px 28px 40px}
h1{font-size:25px;line-height:1.25;margin:0 0 2px}
h2{font-size:18px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.subtitle{color:var(--muted);margin:0 0 18px}
code{font:13px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
dl.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:10px;margin:0}
.facts div{background:var(--panel);border-radius:8px;padding:8px 14px}
.facts dt{font-size:11.5px;letter-spacing:.05em;text-transform:uppercase;color:var(--muted)}
.facts dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
.facts small{display:block;font-weight:400;color:var(--muted);font-size:12.5px}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th{font-weight:600;text-align:left;padding:6px 9px;border-bottom:2px solid var(--line);white-space:nowrap}
td{padding:6px 9px;border-bottom:1px solid var(--soft);white-space:nowrap}
th.num,td.num{text-align:right}
tr.reference td{background:var(--panel)}
tbody tr:hover td{background:#f0f6fc}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:7px;vertical-align:0}
.notes{color:var(--muted);font-size:13px;margin:8px 0 0;padding-left:18px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:18px}
figure{margin:0;border:1px solid var(--line);border-radius:10px;padding:12px 14px 6px}
figcaption{font-weight:600}
figcaption span{display:block;font-weight:400;color:var(--muted);font-size:13px}
svg{display:block;width:100%;height:auto;margin-top:6px}
svg text{fill:var(--fg);font-size:12px}
svg .tick{fill:var(--muted);font-size:11px}
svg .axis-label{font-size:12px;fill:#3d444d}
svg .grid-line{stroke:var(--soft);stroke-width:1}
svg .axis{stroke:#8c959f;stroke-width:1}
footer{margin-top:36px;color:var(--muted);font-size:12.5px}
"""


# ---- scales and axes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """Maps data values in [lo, hi] to pixels [p0, p1]; ``base`` makes it logarithmic."""

    lo: float
    hi: float
    p0: float
    p1: float
    base: float | None = None
    step: float | None = None  # tick spacing of a linear scale

    def __call__(self, v: float) -> float:
        if self.base is None:
            t = (v - self.lo) / (self.hi - self.lo)
        else:
            v = min(max(v, self.lo), self.hi)  # a log axis cannot show 0: such values sit on its floor
            t = math.log(v / self.lo) / math.log(self.hi / self.lo)
        return self.p0 + t * (self.p1 - self.p0)

    def ticks(self) -> list[tuple[float, str]]:
        if self.base is None:
            decimals = max(0, -math.floor(math.log10(self.step) + 1e-9) + (_mantissa(self.step) == 2.5))
            n = round((self.hi - self.lo) / self.step)
            values = (self.lo + i * self.step for i in range(n + 1))
            return [(v, f"{0.0 if abs(v) < self.step / 2 else v:,.{decimals}f}") for v in values]
        first, last = round(math.log(self.lo, self.base)), round(math.log(self.hi, self.base))
        return [(self.base**k, _power_label(self.base, k)) for k in range(first, last + 1)]


def _mantissa(v: float) -> float:
    return round(v / 10 ** math.floor(math.log10(v)), 6)


def _power_label(base: float, k: int) -> str:
    if base == 2:
        return f"{2.0**k:g}×"
    return {0: "1", 1: "10"}.get(k, f"10{str(k).translate(SUPERSCRIPT)}")


def linear_scale(lo: float, hi: float, p0: float, p1: float, target_ticks: int = 5) -> Scale:
    """A linear scale widened to whole multiples of a 1/2/2.5/5 x 10^k step."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)
    return Scale(math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, p0, p1, None, step)


def log_scale(lo: float, hi: float, p0: float, p1: float, base: float = 10.0) -> Scale:
    """A log scale widened to whole powers of ``base``."""
    k_lo = math.floor(math.log(lo, base) + 1e-9)
    k_hi = max(math.ceil(math.log(hi, base) - 1e-9), k_lo + 1)
    return Scale(base**k_lo, base**k_hi, p0, p1, base)


def _n(v: float) -> str:
    return f"{v:.1f}"


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _text(x: float, y: float, s: str, cls: str = "", anchor: str = "start", extra: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}"{klass}{extra}>{_esc(s)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, cls: str = "", style: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}"{klass}{style}/>'


def _svg(width: int, height: float, label: str, body: list[str]) -> str:
    return (f'<svg viewBox="0 0 {width} {_n(height)}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="{_esc(label)}">{"".join(body)}</svg>')


def _axes(xs: Scale, ys: Scale, xlabel: str, ylabel: str, xticks: list[tuple[float, str]] | None = None) -> list[str]:
    """Grid lines, ticks and labels; ``ys.p0`` is the bottom of the plot, ``xs.p0`` its left."""
    out = []
    for v, label in ys.ticks():
        y = ys(v)
        out += [_line(xs.p0, y, xs.p1, y, "grid-line"), _text(xs.p0 - 7, y + 4, label, "tick", "end")]
    for v, label in xticks if xticks is not None else xs.ticks():
        x = xs(v)
        out += [_line(x, ys.p1, x, ys.p0, "grid-line"), _line(x, ys.p0, x, ys.p0 + 4, "axis"),
                _text(x, ys.p0 + 17, label, "tick", "middle")]
    out += [_line(xs.p0, ys.p0, xs.p1, ys.p0, "axis"), _line(xs.p0, ys.p0, xs.p0, ys.p1, "axis"),
            _text((xs.p0 + xs.p1) / 2, ys.p0 + 38, xlabel, "axis-label", "middle")]
    cy = (ys.p0 + ys.p1) / 2
    out.append(_text(16, cy, ylabel, "axis-label", "middle", f' transform="rotate(-90 16 {_n(cy)})"'))
    return out


def _marker(shape: str, x: float, y: float, colour: str, r: float = 5.5) -> str:
    paint = f'fill="{colour}" stroke="#fff" stroke-width="1.5"'
    if shape == "circle":
        return f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{r}" {paint}/>'
    if shape == "square":
        s = r * 0.9
        return f'<rect x="{_n(x - s)}" y="{_n(y - s)}" width="{_n(2 * s)}" height="{_n(2 * s)}" {paint}/>'
    if shape == "diamond":
        points = [(x, y - r * 1.25), (x + r * 1.25, y), (x, y + r * 1.25), (x - r * 1.25, y)]
    else:
        points = [(x, y - r * 1.3), (x + r * 1.2, y + r * 0.9), (x - r * 1.2, y + r * 0.9)]
    return f'<polygon points="{" ".join(f"{_n(px)},{_n(py)}" for px, py in points)}" {paint}/>'


def _format_marker(fmt: str, formats: list[str]) -> str:
    others = [f for f in formats if f not in FORMAT_MARKERS]
    return FORMAT_MARKERS.get(fmt) or OTHER_MARKERS[others.index(fmt) % len(OTHER_MARKERS)]


def _value(v: Enum | str) -> str:
    return v.value if isinstance(v, Enum) else v


def _colours(report: Report) -> dict[str, str]:
    return {a.name: PALETTE[i % len(PALETTE)] for i, a in enumerate(report.artifacts)}


# Past the palette's eight colours, lines repeat a colour with a dash pattern so every artifact stays distinct.
DASHES = ("", "6 3", "2 3")


def _dashes(report: Report) -> dict[str, str]:
    return {a.name: DASHES[(i // len(PALETTE)) % len(DASHES)] for i, a in enumerate(report.artifacts)}


def _dash_style(dash: str) -> str:
    return f' stroke-dasharray="{dash}"' if dash else ""


# ---- plots -----------------------------------------------------------------------------------------------

def _place_labels(points: list[tuple[float, float, str]], bounds: tuple[float, float, float, float],
                  taken: list[tuple[float, float, float, float]]) -> list[str]:
    """Put each point's label beside it where it overlaps no other label, point or ``taken`` box (greedy)."""
    taken = taken + [(x - 6, y - 6, x + 6, y + 6) for x, y, _ in points]
    left, top, right, bottom = bounds
    out = []
    for x, y, text in points:
        w = CHAR_WIDTH * len(text)
        candidates = [(x + 9, y + 4, "start"), (x - 9, y + 4, "end"), (x, y - 10, "middle"), (x, y + 18, "middle"),
                      (x + 9, y - 9, "start"), (x + 9, y + 17, "start"), (x - 9, y - 9, "end"), (x - 9, y + 17, "end")]
        chosen = candidates[0]
        for cx, cy, anchor in candidates:
            x0 = cx - (w if anchor == "end" else w / 2 if anchor == "middle" else 0)
            box = (x0, cy - 10, x0 + w, cy + 2)
            inside = box[0] >= left and box[2] <= right and box[1] >= top and box[3] <= bottom
            if inside and not any(_overlap(box, t) for t in taken):
                chosen = (cx, cy, anchor)
                taken.append(box)
                break
        out.append(_text(chosen[0], chosen[1], text, "", chosen[2], ' font-size="11.5"'))
    return out


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _tradeoff_plot(report: Report, value, ylabel: str, log_y: bool) -> str:
    """One point per artifact: ``value(artifact)`` against bits per weight, points of a format joined."""
    width, height = 540, 350
    left, right, top, bottom = 64, width - 16, 30, height - 52
    arts = report.artifacts
    bpw = [a.bits_per_weight for a in arts]
    xs = linear_scale(min(bpw) - 0.4, max(bpw) + 0.4, left, right, 6)
    ys_values = [value(a) for a in arts]
    if log_y:
        positive = [v for v in ys_values if v > 0] or [1e-6]
        ys = log_scale(min(positive) / 2, max(positive) * 2, bottom, top)  # keep points off the frame
    else:
        ys = linear_scale(min(0.0, *ys_values), max(0.0, *ys_values) * 1.08 or 1.0, bottom, top)
    body = _axes(xs, ys, "bits per weight", ylabel)
    taken = []
    if not log_y:
        y0 = ys(0.0)
        body += [_line(left, y0, right, y0, style=' stroke="#57606a" stroke-dasharray="5 4" stroke-width="1.2"'),
                 _text(left + 6, y0 - 6, "BF16 reference", "tick")]
        taken.append((left, y0 - 16, left + 6 + CHAR_WIDTH * 14, y0))
    formats = list(dict.fromkeys(a.format for a in arts))
    for fmt in formats:
        pts = sorted((xs(a.bits_per_weight), ys(value(a))) for a in arts if a.format == fmt)
        if len(pts) > 1:
            body.append(f'<polyline points="{" ".join(f"{_n(x)},{_n(y)}" for x, y in pts)}" fill="none" '
                        f'stroke="#b6bec7" stroke-width="1.4"/>')
    colours = _colours(report)
    placed = [(xs(a.bits_per_weight), ys(value(a)), a.variant) for a in arts]
    body += [_marker(_format_marker(a.format, formats), x, y, colours[a.name])
             for a, (x, y, _) in zip(arts, placed, strict=True)]
    body += _place_labels(placed, (left, top, right, bottom), taken)
    # legend of marker shapes, top right above the plot
    x = right
    for fmt in reversed(formats):
        x -= CHAR_WIDTH * len(fmt) + 26
        body += [_marker(_format_marker(fmt, formats), x + 6, 14, "#57606a", 4.5), _text(x + 15, 18, fmt, "tick")]
    return _svg(width, height, f"{ylabel} against bits per weight", body)


def _kld_distribution_plot(report: Report) -> str:
    """Overlaid step lines: share of tokens in each fixed KLD bin, with the bins below and above the edges."""
    width, height = 1100, 360
    left, right, top, bottom = 64, width - 190, 22, height - 52
    edges = report.kld_bin_edges
    n_bins = len(edges) - 1
    # x is in bin units: bin i spans [i, i+1]; underflow and overflow sit apart on either side
    under, over = (-2.6, -1.4), (n_bins + 1.4, n_bins + 2.6)
    xs = Scale(under[0] - 0.3, over[1] + 0.3, left, right)
    shares = {a.name: [100 * c / report.evaluation.scored_tokens for c in
                       (a.kld_histogram.underflow, *a.kld_histogram.counts, a.kld_histogram.overflow)]
              for a in report.artifacts}
    ys = linear_scale(0.0, max((max(s) for s in shares.values()), default=1.0) * 1.05, bottom, top)
    per_decade = round(n_bins / math.log10(edges[-1] / edges[0]))
    xticks = [(float(i), _power_label(10, round(math.log10(edges[i])))) for i in range(0, n_bins + 1, per_decade)]
    xticks += [(sum(under) / 2, f"<{xticks[0][1]}"), (sum(over) / 2, f"≥{xticks[-1][1]}")]
    body = _axes(xs, ys, "KL divergence per token (nats), log-spaced bins", "share of tokens per bin (%)", xticks)
    colours, dashes = _colours(report), _dashes(report)
    for a in report.artifacts:
        s = shares[a.name]
        steps = [(xs(0), ys(0))]
        for i, share in enumerate(s[1:-1]):
            steps += [(xs(i), ys(share)), (xs(i + 1), ys(share))]
        steps.append((xs(n_bins), ys(0)))
        paint = (f'fill="none" stroke="{colours[a.name]}" stroke-width="2" stroke-linejoin="round"'
                 f'{_dash_style(dashes[a.name])}')
        body.append(f'<polyline points="{" ".join(f"{_n(x)},{_n(y)}" for x, y in steps)}" {paint}/>')
        for (x0, x1), share in ((under, s[0]), (over, s[-1])):
            body.append(_line(xs(x0), ys(share), xs(x1), ys(share), style=f' stroke="{colours[a.name]}" '
                              'stroke-width="2.5"'))
    body += _legend([(a.name, colours[a.name], dashes[a.name]) for a in report.artifacts], right + 24, top + 6)
    return _svg(width, height, "distribution of per-token KL divergence", body)


def _legend(entries: list[tuple[str, str, str]], x: float, y: float) -> list[str]:
    out = []
    for i, (label, colour, dash) in enumerate(entries):
        yy = y + 20 * i
        out += [_line(x, yy, x + 20, yy, style=f' stroke="{colour}" stroke-width="3"{_dash_style(dash)}'),
                _text(x + 27, yy + 4, label)]
    return out


def _throughput_plot(report: Report, stage: str) -> str:
    """Horizontal bars: the artifact's tokens/s, and BF16's on the same device in grey beneath."""
    timed = [a for a in report.artifacts if a.speed is not None and a.speed.end_to_end is not None]
    width, row = 540, 40
    left, right, top = 136, width - 24, 12
    bottom = top + row * len(timed)
    rates = [(a, getattr(a.speed.end_to_end, f"{stage}_tok_s"), getattr(a.speed.end_to_end, f"bf16_{stage}_tok_s"))
             for a in timed]
    xs = linear_scale(0.0, max(max(r, b) for _, r, b in rates) * 1.3, left, right, 5)
    body = []
    for v, label in xs.ticks():
        body += [_line(xs(v), top, xs(v), bottom, "grid-line"), _text(xs(v), bottom + 16, label, "tick", "middle")]
    colours = _colours(report)
    for i, (a, rate, bf16) in enumerate(rates):
        y = top + i * row + 6
        body += [_text(left - 8, y + 15, a.name, "", "end"),
                 f'<rect x="{left}" y="{_n(y)}" width="{_n(xs(rate) - left)}" height="15" rx="2" '
                 f'fill="{colours[a.name]}"/>',
                 f'<rect x="{left}" y="{_n(y + 18)}" width="{_n(xs(bf16) - left)}" height="7" rx="1.5" '
                 f'fill="{BF16_GREY}"/>',
                 _text(xs(rate) + 5, y + 12, f"{format_rate(rate)} · {format_ratio(rate / bf16)}", "", "start",
                       ' font-size="11.5"'),
                 _text(xs(bf16) + 5, y + 25, f"BF16 {format_rate(bf16)}", "tick")]
    body += [_line(left, top, left, bottom, "axis"),
             _text((left + right) / 2, bottom + 36, "tokens per second", "axis-label", "middle")]
    return _svg(width, bottom + 46, f"{stage} tokens per second", body)


def _linear_speedup_plot(a: Artifact, xs_range: tuple[float, float], batches: list[int]) -> str:
    """Per linear shape, one bar per batch size from 1x to the measured speedup over BF16 (log scale)."""
    groups = list(dict.fromkeys((lin.shape, lin.weight_type) for lin in a.speed.linears))
    speedups = {(lin.shape, lin.weight_type, lin.batch): lin.speedup for lin in a.speed.linears}
    width, bar, gap = 540, 11, 14
    left, right, top = 150, width - 54, 30
    group_h = bar * len(batches) + gap
    bottom = top + group_h * len(groups)
    xs = log_scale(*xs_range, left, right, base=2)
    body = []
    for v, label in xs.ticks():
        body += [_line(xs(v), top, xs(v), bottom, "grid-line"), _text(xs(v), bottom + 16, label, "tick", "middle")]
    for g, (shape, wtype) in enumerate(groups):
        y0 = top + g * group_h + gap / 2
        body.append(_text(left - 10, y0 + bar * len(batches) / 2 + 4, f"{shape[0]}×{shape[1]} {wtype}", "", "end"))
        for b, batch in enumerate(batches):
            s = speedups.get((shape, wtype, batch))
            if s is None:
                continue
            x0, x1 = sorted((xs(1.0), xs(s)))
            y = y0 + b * bar
            body += [f'<rect x="{_n(x0)}" y="{_n(y + 0.5)}" width="{_n(max(x1 - x0, 1.0))}" height="{bar - 1}" '
                     f'fill="{BATCH_SHADES[b % len(BATCH_SHADES)]}"/>',
                     _text(xs(s) + (4 if s >= 1 else -4), y + bar - 1.5, format_ratio(s), "tick",
                           "start" if s >= 1 else "end", ' font-size="10"')]
    body.append(_line(xs(1.0), top - 4, xs(1.0), bottom, style=' stroke="#57606a" stroke-width="1.2"'))
    x = left
    for b, batch in enumerate(batches):
        body += [f'<rect x="{_n(x)}" y="8" width="12" height="10" fill="{BATCH_SHADES[b % len(BATCH_SHADES)]}"/>',
                 _text(x + 17, 17, f"batch {batch}", "tick")]
        x += 34 + CHAR_WIDTH * len(f"batch {batch}")
    body.append(_text((left + right) / 2, bottom + 36, "speedup over BF16 matmul (log scale)", "axis-label", "middle"))
    return _svg(width, bottom + 46, f"{a.name} per-linear speedup over BF16", body)


# ---- page ------------------------------------------------------------------------------------------------

def _figure(title: str, note: str, svg: str, wide: bool = False) -> str:
    style = ' style="grid-column:1/-1"' if wide else ""
    return f'<figure{style}><figcaption>{_esc(title)}<span>{_esc(note)}</span></figcaption>{svg}</figure>'


def _cell_html(cell: Cell) -> str:
    parts = []
    for p in cell:
        if p.field is None:
            parts.append(_esc(p.text))
        else:
            parts.append(f'<span data-field="{_esc(p.field)}" data-value="{_esc(json.dumps(p.value))}">'
                         f'{_esc(p.text)}</span>')
    return "".join(parts)


def _table(report: Report) -> str:
    colours = _colours(report)
    shown = columns(report)
    head = "".join(f'<th class="{"num" if c.numeric else "text"}">{_esc(c.header)}</th>' for c in shown)
    rows = []
    for row in table_rows(report):
        cells = []
        for i, (column, cell) in enumerate(zip(shown, row.cells, strict=True)):
            content = _cell_html(cell)
            if i == 0:
                colour = colours.get(row.key, "#57606a")
                content = f'<span class="swatch" style="background:{colour}"></span>{content}'
            cells.append(f'<td class="{"num" if column.numeric else "text"}">{content}</td>')
        klass = ' class="reference"' if row.key == "reference" else ""
        rows.append(f'<tr data-row="{_esc(row.key)}"{klass}>{"".join(cells)}</tr>')
    notes = "".join(f"<li>{_esc(line)}</li>" for line in notes_lines(report))
    return (f'<div class="table-wrap"><table id="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div><ul class="notes">{notes}</ul>')


def _facts(report: Report) -> str:
    ev, m = report.evaluation, report.reference_metrics
    dev = report.device
    facts = [("Text", ev.text_source, f"sha256 {ev.text_sha256[:12]}"),
             ("Windows", f"{format_int(ev.windows)} × {format_int(ev.ctx)} tokens",
              "the second half of each is scored"),
             ("Scored tokens", format_int(ev.scored_tokens), "same tokens for every model"),
             ("Scored on", dev.name, f"{_value(dev.type)} · {_value(dev.kernel_path)} kernels"),
             ("Reference PPL", f"{format_ppl(m.ppl)} ± {format_ppl(m.ppl_uncertainty)}",
              f"{_value(report.reference.dtype)} weights")]
    return '<dl class="facts">' + "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}<small>{_esc(note)}</small></dd></div>"
                                          for k, v, note in facts) + "</dl>"


def _plots(report: Report) -> str:
    if not report.artifacts:
        return "<p>No artifacts have been measured yet.</p>"
    quality = [
        _figure("Perplexity change vs size", "ΔPPL % against the BF16 reference; lower is better",
                _tradeoff_plot(report, lambda a: a.delta_ppl_pct, "ΔPPL (%)", log_y=False)),
        _figure("KL divergence vs size", "mean KLD in nats, log scale; lower is better",
                _tradeoff_plot(report, lambda a: a.kld.mean, "mean KLD (nats)", log_y=True)),
        _figure("Per-token KL divergence", f"share of the {format_int(report.evaluation.scored_tokens)} scored "
                "tokens in each bin; further left is closer to the reference",
                _kld_distribution_plot(report), wide=True)]
    out = ['<h2 id="quality">Quality</h2><div class="grid">', *quality, "</div>"]
    timed = [a for a in report.artifacts if a.speed is not None and a.speed.end_to_end is not None]
    with_linears = [a for a in report.artifacts if a.speed is not None and a.speed.linears]
    if timed or with_linears:
        out.append('<h2 id="speed">Speed</h2><div class="grid">')
    if timed:
        e2e = timed[0].speed.end_to_end
        out += [_figure("Prefill", f"{e2e.prefill_tokens}-token prompt, one sequence; grey: BF16 on the same "
                        "device", _throughput_plot(report, "prefill")),
                _figure("Decode", f"{e2e.decode_tokens} generated tokens, one sequence; grey: BF16 on the same "
                        "device", _throughput_plot(report, "decode"))]
    if with_linears:
        values = [lin.speedup for a in with_linears for lin in a.speed.linears]
        batches = sorted({lin.batch for a in with_linears for lin in a.speed.linears})
        span = (min(min(values), 1.0), max(max(values), 1.0))
        out += [_figure(f"{a.name}: dequant-GEMM vs BF16 matmul", f"per linear [N×K] and weight type; "
                        f"{a.speed.device.name}, {_value(a.speed.device.kernel_path)} kernels",
                        _linear_speedup_plot(a, span, batches))
                for a in with_linears]
    if timed or with_linears:
        out.append("</div>")
    return "".join(out)


def _embedded_json(report: Report) -> str:
    # escaped so that no "</script>" or "<!--" inside a string can end the element; still the same JSON
    text = report.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="cpmkit-report">\n{text}</script>'


def write_html(report: Report) -> str:
    """The whole page as one string; it loads nothing from anywhere."""
    report.validate()
    ref = report.reference
    title = f"{ref.source}: cpmkit verification report"
    subtitle = (f"{ref.architecture} · {format_count(ref.parameter_count)} parameters · "
                f"{_value(ref.dtype)} · weights sha256 {ref.content_sha256[:12]}")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_esc(ref.source)}</h1><p class=\"subtitle\">cpmkit verification report · {_esc(subtitle)}</p>",
        _facts(report), '<h2 id="results">Results</h2>', _table(report), _plots(report),
        f"<footer>cpmkit {_esc(report.cpmkit_version)} · schema {_esc(report.schema)} · the complete JSON "
        "document is embedded in this page (script#cpmkit-report).</footer>",
        _embedded_json(report), "</main></body></html>", ""])
