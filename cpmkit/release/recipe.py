"""Release recipes: a TOML file listing a shelf's targets, its verification options and its quality gates.

    targets = [
        "gguf:Q8_0",                                              # FORMAT:VARIANT, as --to spells it
        { to = "gguf:Q4_K_M", imatrix = "imatrix.gguf" },         # a table: the target and its format options
        { to = "gguf:Q2_K", max_kld = 0.05 },                     # ... and its own gates
        "mlx:4bit-g64",
    ]

    [model]
    name = "MiniCPM4-0.5B"          # folder and repo names: <name>-Q4_K_M-GGUF, ...
    base_model = "openbmb/MiniCPM4-0.5B"

    [verify]
    ctx = 512
    chunks = 40
    text = "eval.txt"               # relative to the recipe file; or dataset = "wikitext2"
    speed = true
    device = "auto"

    [gates]                         # every artifact's budget, unless its table sets its own
    max_kld = 0.01                  # mean KL divergence from the reference, nats
    max_delta_ppl = 1.0             # perplexity increase over the reference, %

Every key is optional; command-line options override the recipe, ``--to`` targets are added after the
recipe's. Paths (``text``, a target's ``imatrix`` or ``calib``) are relative to the recipe file. A built-in
recipe is named instead of a path (``--recipe demo``: the built-in demo model's shelf). TOML is read with
``tomllib`` (Python 3.11+), or the ``tomli`` backport on 3.10.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from cpmkit.convert.plugin import Target, parse_target
from cpmkit.errors import CpmkitError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

BUILTIN_RECIPES = {"demo": Path(__file__).resolve().parents[1] / "demo" / "release.toml"}
DEFAULT_CTX = 512
DEFAULT_DEVICE = "auto"
GATE_KEYS = ("max_kld", "max_delta_ppl")
PATH_OPTIONS = ("imatrix", "calib")  # target options holding a path, resolved against the recipe's folder
# table -> key -> accepted type
RECIPE_KEYS: dict[str | None, dict[str, type]] = {
    None: {"targets": list},
    "model": {"name": str, "base_model": str},
    "verify": {"ctx": int, "chunks": int, "text": str, "dataset": str, "speed": bool, "device": str},
    "gates": {"max_kld": float, "max_delta_ppl": float},
}


@dataclass(frozen=True)
class Gates:
    """An artifact's quality budget; None: no limit."""

    max_kld: float | None = None  # mean KLD, nats
    max_delta_ppl: float | None = None  # ΔPPL, %

    def __post_init__(self) -> None:
        for key in GATE_KEYS:
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise CpmkitError(f"--{key.replace('_', '-')} {value}: must be a finite number >= 0")

    def misses(self, kld_mean: float, delta_ppl_pct: float) -> list[str]:
        """What the measured artifact exceeds, one phrase each (empty: it passes)."""
        out = []
        if self.max_kld is not None and not kld_mean <= self.max_kld:
            out.append(f"mean KLD {kld_mean:.6f} > {self.max_kld:g}")
        if self.max_delta_ppl is not None and not delta_ppl_pct <= self.max_delta_ppl:
            out.append(f"ΔPPL {delta_ppl_pct:+.2f} % > {self.max_delta_ppl:g} %")
        return out

    def as_json(self) -> dict[str, float | None]:
        return {key: getattr(self, key) for key in GATE_KEYS}


@dataclass(frozen=True)
class ShelfTarget:
    target: Target
    gates: Gates


@dataclass(frozen=True)
class ReleaseOptions:
    targets: tuple[ShelfTarget, ...]
    name: str | None
    base_model: str | None
    text: Path | None  # None: the built-in evaluation text (unless dataset)
    dataset: str | None
    ctx: int
    chunks: int | None
    device: str
    speed: bool


def recipe_path(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    if str(recipe) in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[str(recipe)]
    raise CpmkitError(f"--recipe {recipe}: no such file, and not a built-in recipe ({', '.join(BUILTIN_RECIPES)})")


def read_recipe(recipe: str | Path) -> dict[str | None, dict[str, Any]]:
    """The recipe's values as {table: {key: value}} (top-level keys under None), checked against RECIPE_KEYS;
    paths made absolute relative to the recipe's folder; targets as (text, options, gates) triples."""
    path = recipe_path(recipe)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CpmkitError(f"{path}: not a valid TOML recipe ({e})") from None
    out: dict[str | None, dict[str, Any]] = {table: {} for table in RECIPE_KEYS}
    for key, value in data.items():
        table = key if isinstance(value, dict) else None
        entries = value if isinstance(value, dict) else {key: value}
        if table not in RECIPE_KEYS:
            raise CpmkitError(f"{path}: unknown table [{key}]; known: {', '.join(t for t in RECIPE_KEYS if t)}")
        for name, item in entries.items():
            where = f"{table}.{name}" if table else name
            expected = RECIPE_KEYS[table].get(name)
            if expected is None:
                raise CpmkitError(f"{path}: unknown key {where}; known: {', '.join(RECIPE_KEYS[table])}")
            if expected is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if not isinstance(item, expected) or (expected is int and isinstance(item, bool)):
                raise CpmkitError(f"{path}: {where} must be a {expected.__name__}, got {item!r}")
            out[table][name] = item
    out[None]["targets"] = [_recipe_target(path, t) for t in out[None].get("targets", [])]
    if "text" in out["verify"]:
        out["verify"]["text"] = str((path.parent / out["verify"]["text"]).resolve())
    return out


def _recipe_target(path: Path, entry: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A recipe's target, a string or a table with ``to``: (spec text, format options, gates)."""
    if isinstance(entry, str):
        return entry, {}, {}
    if not isinstance(entry, dict) or not isinstance(entry.get("to"), str):
        raise CpmkitError(f"{path}: each target is a string such as \"gguf:Q4_K_M\" or a table with a string key "
                          f"'to', got {entry!r}")
    options = {k: v for k, v in entry.items() if k != "to" and k not in GATE_KEYS}
    for key in PATH_OPTIONS:
        if isinstance(options.get(key), str):
            options[key] = str((path.parent / options[key]).resolve())
    gates = {k: float(v) for k, v in entry.items() if k in GATE_KEYS and isinstance(v, (int, float))
             and not isinstance(v, bool)}
    bad = [k for k in GATE_KEYS if k in entry and k not in gates]
    if bad:
        raise CpmkitError(f"{path}: target {entry['to']}: {bad[0]} must be a number, got {entry[bad[0]]!r}")
    return entry["to"], options, gates


def shelf_targets(entries: Iterable[tuple[str, dict[str, Any], dict[str, Any]]], default: Gates) -> tuple[ShelfTarget, ...]:
    """Parsed targets in the order given, each once (``mlx:4`` and ``mlx:4bit-g64`` are the same); two entries
    that name the same artifact with different options are refused (they would share a folder)."""
    out: dict[str, ShelfTarget] = {}
    for text, options, gates in entries:
        target = parse_target(text, options)
        entry = ShelfTarget(target, Gates(**{**default.as_json(), **gates}))
        known = out.get(target.name)
        if known is not None and known != entry:
            raise CpmkitError(f"--to {text}: {target.name} is listed twice with different options or gates")
        out.setdefault(target.name, entry)
    return tuple(out.values())


def release_options(targets: tuple[str, ...], recipe: str | Path | None, **overrides: Any) -> ReleaseOptions:
    """The recipe's values, overridden by every option that is not None; targets: the recipe's, then these.
    ``max_kld`` / ``max_delta_ppl`` overrides set the shelf's gates (a recipe target's own gates still win)."""
    read = read_recipe(recipe) if recipe is not None else {table: {} for table in RECIPE_KEYS}
    values = {**read["model"], **read["verify"], **{k: v for k, v in overrides.items()
                                                    if v is not None and k not in GATE_KEYS}}
    if overrides.get("text") is not None or overrides.get("dataset") is not None:
        # a text or dataset given on the command line replaces the recipe's choice of either
        values = {**values, "text": overrides.get("text"), "dataset": overrides.get("dataset")}
    gates = Gates(**{**read["gates"], **{k: overrides[k] for k in GATE_KEYS if overrides.get(k) is not None}})
    parsed = shelf_targets([*read[None].get("targets", []), *((t, {}, {}) for t in targets)], gates)
    if not parsed:
        raise CpmkitError("nothing to release: give --to FORMAT:VARIANT (e.g. --to gguf:Q4_K_M) or a --recipe "
                          "with targets")
    text = values.get("text")
    return ReleaseOptions(
        targets=parsed, name=values.get("name"), base_model=values.get("base_model"),
        text=Path(text) if text is not None else None, dataset=values.get("dataset"),
        ctx=values.get("ctx", DEFAULT_CTX), chunks=values.get("chunks"), device=values.get("device", DEFAULT_DEVICE),
        speed=values.get("speed", True))
