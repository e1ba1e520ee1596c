"""Release recipes: a TOML file listing a shelf's targets and its verification options.

    targets = ["gguf:Q8_0", "gguf:Q4_K_M", "mlx:4"]   # --to specs, in shelf order

    [model]
    name = "MiniCPM4-0.5B"          # folder and repo names: <name>-Q4_K_M-GGUF, ...
    base_model = "openbmb/MiniCPM4-0.5B"

    [verify]
    ctx = 512
    chunks = 40
    text = "eval.txt"               # relative to the recipe file; or dataset = "wikitext2"
    speed = true
    device = "auto"

Every key is optional; command-line options override the recipe, ``--to`` targets are added after the
recipe's. A built-in recipe is named instead of a path (``--recipe demo``: the built-in demo model's shelf).
TOML is read with ``tomllib`` (Python 3.11+), or the ``tomli`` backport on 3.10.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpmkit.convert.release_targets import Target, unique_targets
from cpmkit.errors import CpmkitError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

BUILTIN_RECIPES = {"demo": Path(__file__).resolve().parents[1] / "demo" / "release.toml"}
DEFAULT_CTX = 512
DEFAULT_DEVICE = "auto"
# table -> key -> accepted type
RECIPE_KEYS: dict[str | None, dict[str, type]] = {
    None: {"targets": list},
    "model": {"name": str, "base_model": str},
    "verify": {"ctx": int, "chunks": int, "text": str, "dataset": str, "speed": bool, "device": str},
}


@dataclass(frozen=True)
class ReleaseOptions:
    targets: tuple[Target, ...]
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
    ``verify.text`` made absolute relative to the recipe's folder."""
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
            if not isinstance(item, expected) or (expected is int and isinstance(item, bool)):
                raise CpmkitError(f"{path}: {where} must be a {expected.__name__}, got {item!r}")
            out[table][name] = item
    if not all(isinstance(t, str) for t in out[None].get("targets", [])):
        raise CpmkitError(f"{path}: targets must be a list of strings such as \"gguf:Q4_K_M\"")
    if "text" in out["verify"]:
        out["verify"]["text"] = str((path.parent / out["verify"]["text"]).resolve())
    return out


def release_options(targets: tuple[str, ...], recipe: str | Path | None, **overrides: Any) -> ReleaseOptions:
    """The recipe's values, overridden by every option that is not None; targets: the recipe's, then these."""
    read = read_recipe(recipe) if recipe is not None else {table: {} for table in RECIPE_KEYS}
    values = {**read["model"], **read["verify"], **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("text") is not None or overrides.get("dataset") is not None:
        # a text or dataset given on the command line replaces the recipe's choice of either
        values = {**values, "text": overrides.get("text"), "dataset": overrides.get("dataset")}
    parsed = unique_targets([*read[None].get("targets", []), *targets])
    if not parsed:
        raise CpmkitError("nothing to release: give --to FORMAT:VARIANT (e.g. --to gguf:Q4_K_M) or a --recipe "
                          "with targets")
    text = values.get("text")
    return ReleaseOptions(
        targets=parsed, name=values.get("name"), base_model=values.get("base_model"),
        text=Path(text) if text is not None else None, dataset=values.get("dataset"),
        ctx=values.get("ctx", DEFAULT_CTX), chunks=values.get("chunks"), device=values.get("device", DEFAULT_DEVICE),
        speed=values.get("speed", True))
