"""JSON object files (config.json, tokenizer_config.json, indexes) read with one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpmkit.errors import CpmkitError


def read_json_object(path: Path, *, required: bool = True, missing: str = "not found") -> dict[str, Any]:
    """The JSON object in ``path``. A missing file raises CpmkitError (``path: missing``) when ``required``,
    else gives ``{}``; invalid JSON or a non-object always raises."""
    if not path.is_file():
        if required:
            raise CpmkitError(f"{path}: {missing}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CpmkitError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CpmkitError(f"{path}: expected a JSON object")
    return data
