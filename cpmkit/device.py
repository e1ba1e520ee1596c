"""``--device auto|cpu|cuda[:N]`` as a torch device, checked."""

from __future__ import annotations

import torch

from cpmkit.errors import CpmkitError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CpmkitError(f"--device {device}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CpmkitError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    return torch.device(device)
