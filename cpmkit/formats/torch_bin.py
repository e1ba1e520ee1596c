"""PyTorch ``pytorch_model*.bin`` checkpoints, read without running code from them.

Old MiniCPM repos ship .bin files. They are pickles, so they are opened only through
``torch.load(weights_only=True)``, whose unpickler refuses every global but tensor rebuilds, and the
result must be a flat mapping of names to tensors. ``mmap=True`` keeps the storage on disk until a
tensor is touched, so streaming one tensor at a time stays near one tensor's memory.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from cpmkit.errors import CpmkitError


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Open a .bin checkpoint lazily (memory-mapped); every value is checked to be a tensor."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CpmkitError(f"{path}: refused to unpickle: the file holds more than tensors ({reason}); "
                          "cpmkit never runs code from a checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CpmkitError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise CpmkitError(f"{path}: expected a mapping of tensor names to tensors, found {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CpmkitError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; "
                              "only plain state dicts are read")
    return obj
