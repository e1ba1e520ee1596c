"""Importance matrices for GGUF quantization: computed from a checkpoint with cpmkit's reference model
(what ``llama-imatrix`` records, under llama.cpp's tensor names) and turned into the per-column weights
``llama-quantize`` hands its quantizers.

Computing: the calibration text is tokenized and cut into windows as llama-imatrix does (BOS first, one
window per ``ctx`` tokens, KV cleared between windows), the reference model runs them block by block
(``cpmkit.models.streamed``: one block in memory), and ``cpmkit.quant.imatrix`` sums the squared inputs of
every block linear (the MoE router included; the head is left out, as without ``--process-output``).
Expert linears are merged into their 3-D GGUF tensor's entry, one row of sums and one count per expert.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from cpmkit.atomic import atomic_file
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gguf.families import gguf_family
from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.imatrix import ImatrixData, ImatrixEntry, write_imatrix
from cpmkit.models.reference import checkpoint_source
from cpmkit.models.streamed import BlockPass, StreamedRunner
from cpmkit.models.windows import make_windows
from cpmkit.quant.imatrix import ActivationStats
from cpmkit.tokenizer import Tokenizer

BLOCK_PREFIX = "model.layers."  # llama-imatrix collects blk.* weights only


def compute_gguf_imatrix(ck: Checkpoint, text: str, *, ctx: int = 512, max_chunks: int | None = None,
                         batch: int = 1, dataset: str = "calibration", progress: Callable[[Iterable], Iterable] = iter
                         ) -> ImatrixData:
    """llama-imatrix's statistics for ``ck`` on ``text`` (``dataset`` names it in the file), keyed by GGUF
    tensor name. ``progress`` wraps the loop over forward passes."""
    tok = Tokenizer(ck.root, ck.config)
    windows = make_windows(tok.encode(text), ctx, tok.special.bos_id if tok.special.add_bos else None, max_chunks)
    collector = _Collector()
    StreamedRunner(checkpoint_source(ck), progress=progress, batch=batch).calibrate(windows.tokens, collector)
    stats = collector.stats
    family = gguf_family(ck.spec)
    grouped: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}
    for name, s in stats.items():
        mapped = family.map_name(name + ".weight")
        assert mapped is not None, name
        grouped.setdefault(mapped.gguf, {})[mapped.expert or 0] = (s.sums, s.count)
    entries = {}
    for gguf_name, per_matrix in sorted(grouped.items()):
        order = sorted(per_matrix)
        sums = torch.stack([per_matrix[i][0] for i in order])  # [n_mat, in_features]
        counts = torch.tensor([per_matrix[i][1] for i in order], dtype=torch.int64)
        entries[gguf_name] = ImatrixEntry(sums, counts)
    return ImatrixData(entries, datasets=(dataset,), chunk_count=windows.tokens.shape[0], chunk_size=ctx)


class _Collector:
    """A block visitor summing the squared inputs of each of the block's linears (names in checkpoint form)."""

    def __init__(self) -> None:
        self.stats: dict[str, ActivationStats] = {}

    def visit(self, index: int, block: nn.Module, run: BlockPass) -> None:
        hooks = {}
        for name, module in block.named_modules():
            if name and hasattr(module, "in_features"):
                stats = self.stats[f"{BLOCK_PREFIX}{index}.{name}"] = ActivationStats(
                    torch.zeros(module.in_features, dtype=torch.float32))
                hooks[name] = stats.add
        run.advance(hooks)


def save_gguf_imatrix(imatrix: ImatrixData, out_path: str | Path, *, overwrite: bool = False) -> ImatrixData:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format, atomically; returns it with ``path`` set, so a
    conversion using it records the file as llama-quantize does."""
    out_path = Path(out_path)
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        write_imatrix(tmp, imatrix)
    return dataclasses.replace(imatrix, path=str(out_path))


def importance(imatrix: ImatrixData, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The per-column weights llama-quantize passes for tensor ``name`` of ``shape`` (tools/quantize
    ``load_imatrix``): GGUF statistics ``sums / count`` per matrix (1 where a matrix saw no token), legacy
    ones ``values / ncall``; None when the imatrix has no entry (llama-quantize then quantizes without)."""
    entry = imatrix.entries.get(name)
    if entry is None:
        return None
    if imatrix.legacy:
        ncall = int(entry.counts[0])
        flat = entry.sums.reshape(-1)
        weights = flat / float(ncall) if ncall > 0 else flat.clone()
    else:
        counts = entry.counts.to(torch.float32)[:, None]  # [n_mat, 1]
        weights = torch.where(counts > 0, entry.sums / counts.clamp(min=1), torch.ones_like(entry.sums))
        weights = weights.reshape(-1)
    n_mat = shape[0] if len(shape) == 3 else 1
    if weights.numel() != n_mat * shape[-1]:
        # llama-quantize aborts here too ("imatrix size ... is different from tensor size")
        raise CpmkitError(f"{name}: the imatrix holds {weights.numel()} values, the tensor needs "
                          f"{n_mat * shape[-1]} ({n_mat} x {shape[-1]} columns)")
    if not torch.isfinite(weights).all():
        raise CpmkitError(f"{name}: the imatrix holds non-finite values")
    return weights
