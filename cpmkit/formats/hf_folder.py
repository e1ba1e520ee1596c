"""Conventions of a Hugging Face model folder that every folder format shares: which tokenizer and
generation files travel with the weights (copied verbatim: re-saving through transformers rewrites them), the
license keys of the source's model card, the card's front matter, and the config of a quantized folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # transformers builds a tokenizer from one
# Tokenizer and generation files copied verbatim from the source folder (mlx-lm and transformers re-save the
# tokenizer instead, which rewrites the files).
COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
# tokenization_*.py: a tokenizer_config.json auto_map may name a custom tokenizer class. Modeling code is a
# format's own choice (MLX drops config.json's auto_map; GPTQ keeps the source's files for transformers).
COPIED_GLOBS = ("*.tiktoken", "tokenization_*.py")
# A model's own code (auto_map in config.json names it): copied for runtimes that load it with
# trust_remote_code (transformers has no native ``minicpm``); cpmkit never runs it.
MODELING_GLOBS = ("configuration_*.py", "modeling_*.py")
CARD_NAME = "README.md"
# Keys of a source card's front matter carried over to ours.
LICENSE_KEYS = ("license", "license_name", "license_link")
SAFETENSORS_METADATA = {"format": "pt"}  # the header metadata transformers expects of a PyTorch model's shards
# a source's own quantization settings, which a re-quantized folder's must replace, not sit beside
SOURCE_QUANTIZATION_KEYS = ("quantization_config", "compression_config")


def write_quantized_config(folder: Path, source_config: dict, quantization: dict) -> None:
    """``folder``'s config.json: the source's config with ``quantization`` as its ``quantization_config``."""
    config = {k: v for k, v in source_config.items() if k not in SOURCE_QUANTIZATION_KEYS}
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def has_tokenizer(source: Path) -> bool:
    return any((source / name).is_file() for name in TOKENIZER_FILES)


def copy_source_files(source: Path, folder: Path, *, skip_existing: bool = False) -> list[str]:
    """Copy the tokenizer and generation files that exist in ``source`` (not over ones ``folder`` has, with
    ``skip_existing``); returns their names."""
    names = [n for n in COPIED_FILES if (source / n).is_file()]
    names += sorted(p.name for g in COPIED_GLOBS for p in source.glob(g) if p.is_file())
    return _copy(source, folder, names, skip_existing)


def copy_modeling_files(source: Path, folder: Path, *, skip_existing: bool = False) -> list[str]:
    names = sorted(p.name for g in MODELING_GLOBS for p in source.glob(g) if p.is_file())
    return _copy(source, folder, names, skip_existing)


def _copy(source: Path, folder: Path, names: list[str], skip_existing: bool) -> list[str]:
    copied = [n for n in names if not (skip_existing and (folder / n).exists())]
    for name in copied:
        shutil.copyfile(source / name, folder / name)
    return copied


def card_front_matter(source: Path) -> dict[str, str]:
    """The license keys of ``source``'s README.md front matter (``key: value`` lines between ``---``)."""
    card = source / CARD_NAME
    if not card.is_file():
        return {}
    match = re.match(r"---\s*\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    if not match:
        return {}
    found = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in LICENSE_KEYS and value.strip():
            found[key.strip()] = value.strip()
    return found


def write_model_card(folder: Path, *, front: dict[str, str | list[str]], title: str, summary: str, usage: str,
                     base_model: str | None, license_keys: dict[str, str]) -> None:
    """``README.md``: YAML front matter (``front``'s keys in order, a list as ``- item`` lines; then base_model
    and the source's license keys), a title, a summary and ``usage`` (markdown)."""
    lines = ["---"]
    for key, value in front.items():
        lines += [f"{key}:", *(f"- {v}" for v in value)] if isinstance(value, list) else [f"{key}: {value}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += [f"{k}: {v}" for k, v in license_keys.items()]
    lines.append("---")
    body = f"# {title}\n\n{summary}\n\n{usage.strip()}\n"
    (folder / CARD_NAME).write_text("\n".join(lines) + "\n\n" + body, encoding="utf-8")
