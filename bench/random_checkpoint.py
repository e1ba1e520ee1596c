"""Large random checkpoints for the benchmarks, written tensor by tensor (never the whole model in memory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from cpmkit.formats.safetensors import StreamingWriter
from cpmkit.spec import read_spec
from cpmkit.testing import build_checkpoint

ROWS_PER_DRAW = 8192  # random rows generated at a time, so generation stays tensor-by-tensor small
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json")


def write_random_checkpoint(folder: Path, variant: str, shape: dict[str, Any]) -> Path:
    """A checkpoint of the fixture ``variant``'s config with ``shape``'s keys, random bf16 weights (std 0.02)
    and the fixture's tokenizer; kept when ``folder`` already holds one."""
    if (folder / "model.safetensors").is_file():
        return folder
    tiny = build_checkpoint(folder.parent / f"tokenizer-source-{variant}", variant)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**json.loads((tiny / "config.json").read_text()), **shape}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copy(tiny / name, folder / name)
    shapes = read_spec(config).tensor_shapes()
    gen = torch.Generator().manual_seed(0)
    partial = folder / "model.safetensors.partial"
    with StreamingWriter(partial, [(n, torch.bfloat16, s) for n, s in shapes.items()]) as writer:
        for name, dims in shapes.items():
            if len(dims) == 1:
                writer.write(name, (1 + 0.1 * torch.randn(dims, generator=gen)).to(torch.bfloat16))
                continue
            rows = [(0.02 * torch.randn(min(ROWS_PER_DRAW, dims[0] - r), dims[1], generator=gen)).to(torch.bfloat16)
                    for r in range(0, dims[0], ROWS_PER_DRAW)]
            writer.write(name, torch.cat(rows))
    partial.rename(folder / "model.safetensors")
    return folder
