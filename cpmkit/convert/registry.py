"""The artifact formats cpmkit makes and reads: one line per format plug-in."""

from __future__ import annotations

from pathlib import Path

from cpmkit.convert.awq import AWQFormat
from cpmkit.convert.gguf import GGUFFormat
from cpmkit.convert.gptq import GPTQFormat
from cpmkit.convert.marlin import MarlinFormat
from cpmkit.convert.mlx import MLXFormat
from cpmkit.convert.plugin import FormatPlugin
from cpmkit.convert.ternary import TernaryFormat
from cpmkit.errors import CpmkitError

FORMATS: dict[str, FormatPlugin] = {p.name: p for p in (
    GGUFFormat(),
    MLXFormat(),
    GPTQFormat(),
    MarlinFormat(),
    AWQFormat(),
    TernaryFormat(),
)}


def plugin_named(name: str, where: str) -> FormatPlugin:
    if name not in FORMATS:
        raise CpmkitError(f"{where}: unknown format {name!r}; expected FORMAT[:VARIANT] with FORMAT one of "
                          f"{', '.join(FORMATS)} (e.g. gguf:Q4_K_M, mlx:4bit-g64)")
    return FORMATS[name]


def detect_artifact(path: str | Path) -> FormatPlugin | None:
    """The plug-in whose artifact ``path`` is, or None."""
    path = Path(path)
    return next((p for p in FORMATS.values() if p.detect(path)), None)


def artifact_plugin(path: str | Path) -> FormatPlugin:
    """The plug-in of the artifact at ``path``; one CpmkitError line when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise CpmkitError(f"{path}: no such file or folder")
    plugin = detect_artifact(path)
    if plugin is None:
        hint = " (it looks like a Hugging Face checkpoint: pass it as --reference)" \
            if (path / "config.json").is_file() else ""
        raise CpmkitError(f"{path}: not an artifact cpmkit can read{hint}; expected one of: "
                          f"{'; '.join(p.description for p in FORMATS.values())}")
    return plugin
