"""What a GGUF file holds, for ``cpmkit inspect`` and ``verify``: architecture, file type, metadata (long
arrays summarised), every tensor's type and shape, size and bits per weight."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from gguf import Keys

from cpmkit.convert.gguf.mix import GGUFFileType
from cpmkit.formats.gguf.file import read_gguf


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """``cpmkit inspect OUT.gguf``: architecture, metadata (long arrays summarised), every tensor's type and
    shape, file size and bits per weight."""
    contents = read_gguf(path)
    tensors = [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape)} for t in contents.tensors.values()]
    n_weights = sum(math.prod(t.shape) for t in contents.tensors.values())
    data_bytes = sum(t.raw.nbytes for t in contents.tensors.values())
    type_counts = dict(Counter(t.qtype.name for t in contents.tensors.values()))
    return {
        "path": str(contents.path),
        "architecture": contents.architecture,
        "file_type": _file_type_name(contents.metadata.get(Keys.General.FILE_TYPE)),
        "metadata": {k: _summary(v) for k, v in contents.metadata.items()},
        "tensors": tensors,
        "tensor_types": type_counts,
        "parameters": n_weights,
        "file_size": contents.path.stat().st_size,
        "bits_per_weight": round(8 * data_bytes / n_weights, 4) if n_weights else None,
    }


def _file_type_name(value: int | None) -> str | None:
    if value is None:
        return None
    return next((f.value for f in GGUFFileType if f.llama_file_type == value), str(value))


def _summary(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 8:
        return {"count": len(value), "first": value[:4], "last": value[-2:]}
    return value



def format_gguf_text(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_gguf`'s dict: a summary, then one line per tensor."""
    meta = info["metadata"]
    arch = info["architecture"]
    shape_keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                  "attention.head_count_kv", "context_length", "expert_count")
    shape = ", ".join(f"{k} {meta[f'{arch}.{k}']}" for k in shape_keys if f"{arch}.{k}" in meta)
    tokens = meta.get(Keys.Tokenizer.LIST)
    lines = [
        info["path"],
        f"  architecture  {arch}, file type {info['file_type']}",
        f"  shape         {shape}",
        f"  tokenizer     {meta.get(Keys.Tokenizer.MODEL)} / {meta.get(Keys.Tokenizer.PRE)}, "
        f"{tokens['count'] if isinstance(tokens, dict) else len(tokens or [])} tokens",
        f"  size          {info['file_size'] / 2**20:.2f} MiB, {info['parameters']:,} weights, "
        f"{info['bits_per_weight']} bits per weight",
        f"  types         {', '.join(f'{k} x{v}' for k, v in info['tensor_types'].items())}",
    ]
    lines += [f"    {t['name']:<36} {t['type']:<6} {t['shape']}" for t in info["tensors"]]
    return "\n".join(lines)
