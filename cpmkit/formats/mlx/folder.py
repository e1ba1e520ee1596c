"""The folder layout mlx-lm reads and writes (mlx-lm 0.32: ``save_model``, ``save_config``, ``load_model``).

A folder holds:

* ``config.json``: the model config plus ``quantization`` (the default ``{group_size, bits, mode}`` and
  one entry per module path whose setting differs) and the same dict under ``quantization_config``;
  top-level keys sorted, indent 4 (``save_config``). The loader needs ``quantization``;
  ``quantization_config`` only makes the Hugging Face model tree show "Quantized".
* ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` when the tensors pass 5 GiB
  (``make_shards``: a new shard starts when the next tensor would pass the limit), each with
  metadata ``{"format": "mlx"}``, and always ``model.safetensors.index.json`` (total_size,
  total_parameters, weight_map sorted by name). The loader globs ``model*.safetensors`` and never
  needs the index.
* A quantized module stores ``<path>.weight`` uint32 ``[N, K*bits/32]`` (codes packed by
  ``cpmkit.formats.mlx.pack``), ``<path>.scales`` and ``<path>.biases`` ``[N, K/group_size]`` in the
  float dtype; a float module stores only ``<path>.weight``. The loader quantizes a module exactly when
  ``<path>.scales`` is present, so float layers need no config entry.
* The tokenizer files and ``generation_config.json``, and a ``README.md`` model card.

Tensors are written one at a time through :class:`MlxFolderWriter`, whose shards and headers are fixed
from the declared slots before the first byte.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats import safetensors as st
from cpmkit.jsonfile import read_json_object

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_GLOB = "model*.safetensors"  # what mlx_lm.utils.load_model reads
MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB = 5, applied as `5 << 30`
SAFETENSORS_METADATA = {"format": "mlx"}
CONFIG_INDENT = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # transformers builds a tokenizer from one
# Tokenizer and generation files copied verbatim from the source folder (mlx-lm re-saves the tokenizer
# through transformers instead, which rewrites the files).
COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
# tokenization_*.py: a tokenizer_config.json auto_map may name a custom tokenizer class (remote modeling code
# is not copied: its auto_map is dropped from config.json).
COPIED_GLOBS = ("*.tiktoken", "tokenization_*.py")
CARD_NAME = "README.md"
# Keys of a source card's front matter carried over to ours.
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the folder, declared before writing. ``parameters`` is its count of logical weights
    (a packed uint32 word holds 32/bits of them; scales and biases count none), as mlx-lm's
    ``get_total_parameters`` reports them."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parameters: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class LayerQuantization(Protocol):
    """One layer's setting as config.json records it (``cpmkit.quant.affine.AffineSpec`` is one)."""

    bits: int
    group_size: int
    mode: str


def quant_entry(spec: LayerQuantization) -> dict[str, Any]:
    """The dict mlx-lm passes to ``to_quantized`` for one layer (and writes as the default)."""
    return {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}


def quantization_config(default: LayerQuantization, layers: dict[str, LayerQuantization]) -> dict[str, Any]:
    """The ``quantization`` value: the default setting, then module path -> setting for each layer that
    differs from it, in the order given."""
    out = quant_entry(default)
    out.update({path: quant_entry(spec) for path, spec in layers.items() if spec != default})
    return out


def plan_shards(slots: list[TensorSlot], max_bytes: int | None = None) -> list[list[TensorSlot]]:
    """Cut the slots, in order, into shards as ``make_shards`` does: a shard is closed when the next tensor
    would take it past ``max_bytes``; a tensor larger than the limit gets a shard of its own."""
    limit = MAX_SHARD_BYTES if max_bytes is None else max_bytes
    shards: list[list[TensorSlot]] = []
    size = 0
    for slot in slots:
        if not shards or size + slot.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class MlxFolderWriter:
    """Writes the declared slots, in order, into ``folder``'s safetensors shards, one tensor at a time; only
    the shard being written is open. Leaving the ``with`` block normally checks that every slot was written
    and writes the index."""

    def __init__(self, folder: Path, slots: list[TensorSlot], max_shard_bytes: int | None = None):
        if len({s.name for s in slots}) != len(slots):
            raise ValueError("MlxFolderWriter: duplicate tensor names")
        self.folder = folder
        self._shards = plan_shards(slots, max_shard_bytes)
        self._files = shard_file_names(len(self._shards))
        self._slots = slots
        self._shard = -1
        self._left = 0  # tensors still to write in the open shard
        self._writer: st.StreamingWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            self._open_next()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._left -= 1
        if self._left == 0:
            self._writer.close()
            self._writer = None

    def _open_next(self) -> None:
        self._shard += 1
        if self._shard >= len(self._shards):
            raise ValueError(f"{self.folder}: more tensors written than declared")
        shard = self._shards[self._shard]
        self._writer = st.StreamingWriter(self.folder / self._files[self._shard],
                                          [(s.name, s.dtype, s.shape) for s in shard], SAFETENSORS_METADATA)
        self._left = len(shard)

    def close(self) -> None:
        if self._writer is not None or self._shard != len(self._shards) - 1:
            raise ValueError(f"{self.folder}: closed before every declared tensor was written")
        weight_map = {s.name: self._files[i] for i, shard in enumerate(self._shards) for s in shard}
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self._slots),
                         "total_parameters": sum(s.parameters for s in self._slots)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=CONFIG_INDENT))

    def __enter__(self) -> "MlxFolderWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.__exit__(exc_type, exc, tb)  # closes the open shard without completing it
            self._writer = None


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """``config.json`` as ``save_config`` writes it: top-level keys sorted, indent 4, ``quantization``
    copied to ``quantization_config``."""
    out = dict(config)
    if "quantization" in out:
        out["quantization_config"] = out["quantization"]
    (folder / CONFIG_NAME).write_text(json.dumps(dict(sorted(out.items())), indent=CONFIG_INDENT))


def has_tokenizer(source: Path) -> bool:
    return any((source / name).is_file() for name in TOKENIZER_FILES)


def copy_source_files(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer and generation files that exist in ``source``; returns their names."""
    names = [n for n in COPIED_FILES if (source / n).is_file()]
    names += sorted(p.name for g in COPIED_GLOBS for p in source.glob(g) if p.is_file())
    for name in names:
        shutil.copyfile(source / name, folder / name)
    return names


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


def write_model_card(folder: Path, *, title: str, summary: str, usage: str, base_model: str | None,
                     license_keys: dict[str, str]) -> None:
    """``README.md`` with the front matter mlx-lm's ``create_model_card`` sets (library_name mlx, tag mlx,
    pipeline_tag text-generation, base_model) plus the source's license keys; ``usage`` is markdown."""
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags:", "- mlx"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += [f"{k}: {v}" for k, v in license_keys.items()]
    front.append("---")
    body = f"# {title}\n\n{summary}\n\n{usage.strip()}\n"
    (folder / CARD_NAME).write_text("\n".join(front) + "\n\n" + body, encoding="utf-8")


# ---- reading ----------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / CONFIG_NAME, missing="not found; not an MLX model folder")


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    entry: st.TensorEntry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    def read(self) -> torch.Tensor:
        return st.read_tensor(self.file, self.entry)


def index_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor in the folder's ``model*.safetensors`` files (the files mlx-lm loads), by name."""
    files = sorted(folder.glob(WEIGHT_GLOB))
    if not files:
        raise CpmkitError(f"{folder}: no {WEIGHT_GLOB} files; not an MLX model folder")
    found: dict[str, StoredTensor] = {}
    for file in files:
        entries, _ = st.read_header(file)
        for name, entry in entries.items():
            if name in found:
                raise CpmkitError(f"{file}: tensor {name} is also in {found[name].file.name}")
            found[name] = StoredTensor(file, entry)
    return found
