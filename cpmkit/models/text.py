"""Evaluation text: a file, the built-in text (sampled from the demo model, so no download is needed), or a
named dataset fetched with `datasets` when a network exists. Calibration text: a file, or the built-in one (the
first 250 kB of Shakespeare the demo model was trained on, public domain: apart from the evaluation text)."""

from __future__ import annotations

from pathlib import Path

from cpmkit.errors import CpmkitError

BUILTIN_TEXT = Path(__file__).resolve().parents[1] / "demo" / "eval.txt"
CALIBRATION_TEXT = BUILTIN_TEXT.with_name("calib.txt")
# name -> (datasets path, config); a split's rows joined as llama.cpp's wiki.test.raw is
DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}


def load_text(text_file: str | Path | None = None, dataset: str | None = None, split: str = "test") -> str:
    """A text file's contents, or a named dataset's ``split`` (evaluation reads test, calibration train);
    neither: the built-in evaluation text."""
    if text_file is not None and dataset is not None:
        raise CpmkitError("give either a text file or a dataset, not both")
    if dataset is not None:
        return _dataset_text(dataset, split)
    path = Path(text_file) if text_file is not None else BUILTIN_TEXT
    if not path.is_file():
        raise CpmkitError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CpmkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def calibration_text(text_file: str | Path | None = None, dataset: str | None = None) -> str:
    """A calibration text file, a named dataset's train split, or the built-in calibration text."""
    if text_file is None and dataset is None:
        text_file = CALIBRATION_TEXT
    return load_text(text_file, dataset, split="train")


def _dataset_text(name: str, split: str) -> str:
    if name not in DATASETS:
        raise CpmkitError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    try:
        import datasets
    except ImportError:
        raise CpmkitError(f"dataset {name} needs the `datasets` package (pip install datasets)") from None
    path, config = DATASETS[name]
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline, hub errors: all mean the text is not available
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CpmkitError(f"dataset {name}: could not load {path}/{config} {split} ({first})") from None
    return "".join(rows["text"])
