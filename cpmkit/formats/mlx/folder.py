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

Tensors are written one at a time through :func:`folder_writer` (``cpmkit.formats.safetensors.ShardedWriter``),
whose shards and headers are fixed from the declared slots before the first byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from cpmkit.formats import hf_folder as hf
from cpmkit.formats import safetensors as st
from cpmkit.jsonfile import read_json_object

CONFIG_NAME = "config.json"
INDEX_NAME = st.INDEX_NAME
WEIGHT_GLOB = "model*.safetensors"  # what mlx_lm.utils.load_model reads
MAX_SHARD_BYTES = st.MAX_SHARD_BYTES  # mlx_lm.utils.MAX_FILE_SIZE_GB = 5, applied as `5 << 30`
SAFETENSORS_METADATA = {"format": "mlx"}
CONFIG_INDENT = 4


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


def folder_writer(folder: Path, slots: list[st.TensorSlot]) -> st.ShardedWriter:
    """The writer of the folder's weights, sharded as mlx-lm shards them."""
    return st.ShardedWriter(folder, slots, SAFETENSORS_METADATA, max_shard_bytes=MAX_SHARD_BYTES,
                            indent=CONFIG_INDENT)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """``config.json`` as ``save_config`` writes it: top-level keys sorted, indent 4, ``quantization``
    copied to ``quantization_config``."""
    out = dict(config)
    if "quantization" in out:
        out["quantization_config"] = out["quantization"]
    (folder / CONFIG_NAME).write_text(json.dumps(dict(sorted(out.items())), indent=CONFIG_INDENT))


def write_mlx_card(folder: Path, *, title: str, summary: str, usage: str, base_model: str | None,
                   license_keys: dict[str, str]) -> None:
    """``README.md`` with the front matter mlx-lm's ``create_model_card`` sets (library_name mlx, tag mlx,
    pipeline_tag text-generation, base_model) plus the source's license keys."""
    hf.write_model_card(folder, front={"library_name": "mlx", "pipeline_tag": "text-generation", "tags": ["mlx"]},
                        title=title, summary=summary, usage=usage, base_model=base_model, license_keys=license_keys)


# ---- reading ----------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / CONFIG_NAME, missing="not found; not an MLX model folder")


def index_tensors(folder: Path) -> dict[str, st.StoredTensor]:
    """Every tensor in the folder's ``model*.safetensors`` files (the files mlx-lm loads), by name."""
    return st.index_folder(folder, (WEIGHT_GLOB,), "an MLX model folder")
