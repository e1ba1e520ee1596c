"""Evaluation text: a file, the built-in text (sampled from the demo model, so no download is needed), or a
named dataset fetched with `datasets` when a network exists."""

from __future__ import annotations

from pathlib import Path

from cpmkit.errors import CpmkitError

BUILTIN_TEXT = Path(__file__).resolve().parents[1] / "demo" / "eval.txt"
# name -> (datasets path, config, split); joined as llama.cpp's wiki.test.raw is
DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}


def load_text(text_file: str | Path | None = None, dataset: str | None = None) -> str:
    if text_file is not None and dataset is not None:
        raise CpmkitError("give either --text or --dataset, not both")
    if dataset is not None:
        return _dataset_text(dataset)
    path = Path(text_file) if text_file is not None else BUILTIN_TEXT
    if not path.is_file():
        raise CpmkitError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CpmkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _dataset_text(name: str) -> str:
    if name not in DATASETS:
        raise CpmkitError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    try:
        import datasets
    except ImportError:
        raise CpmkitError(f"--dataset {name} needs the `datasets` package (pip install datasets)") from None
    path, config, split = DATASETS[name]
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline, hub errors: all mean the text is not available
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CpmkitError(f"--dataset {name}: could not load {path}/{config} ({first})") from None
    return "".join(rows["text"])
