"""What a verification is measured against and on: the evaluation text, the device, the reference's identity,
and where the reference's log-probs are cached."""

from __future__ import annotations

import hashlib
import os
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.device import resolve_device  # noqa: F401  (re-exported for verify)
from cpmkit.errors import CpmkitError
from cpmkit.models.text import BUILTIN_TEXT, load_text
from cpmkit.verify.report import Device, DeviceType, Dtype, KernelPath, Reference

HASH_CHUNK = 1 << 24
CACHE_ENV = "CPMKIT_CACHE"
STORED_DTYPES = {torch.bfloat16: Dtype.BFLOAT16, torch.float16: Dtype.FLOAT16, torch.float32: Dtype.FLOAT32}


def default_cache_dir() -> Path:
    """``$CPMKIT_CACHE/reference``, else ``$XDG_CACHE_HOME/cpmkit/reference``, else ``~/.cache/cpmkit/reference``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "reference"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpmkit" / "reference"


@dataclass(frozen=True)
class EvalText:
    text: str
    source: str  # report's evaluation.text_source: builtin, file:NAME, dataset:NAME

    @classmethod
    def load(cls, text_file: str | Path | None = None, dataset: str | None = None) -> EvalText:
        text = load_text(text_file, dataset)
        if dataset is not None:
            return cls(text, f"dataset:{dataset}")
        if text_file is None or Path(text_file).resolve() == BUILTIN_TEXT:
            return cls(text, "builtin")
        return cls(text, f"file:{Path(text_file).name}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                threads = torch.get_num_threads()
                return f"{line.partition(':')[2].strip()}, {threads} thread{'s' if threads != 1 else ''}"
    return platform.processor() or platform.machine() or "CPU"


def score_dtype(device: torch.device) -> torch.dtype:
    """The activations' dtype for scoring: bf16 on CUDA (what a deployment runs; the kernels and cuBLAS
    accumulate in float32), float32 on CPU (the torch path dequantizes to float32 anyway)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def report_device(device: torch.device, cpu_note: str, cuda_note: str) -> Device:
    """The report's device, its name followed by how the models ran there (the kernel path alone cannot say)."""
    if device.type == "cuda":
        return Device(DeviceType.CUDA, f"{device_name(device)}; {cuda_note}", KernelPath.TRITON)
    return Device(DeviceType.CPU, f"{device_name(device)}; {cpu_note}", KernelPath.TORCH)


def weights_sha256(ck: Checkpoint) -> str:
    """SHA-256 of the weight files' bytes, concatenated in sorted file-name order."""
    digest = hashlib.sha256()
    for file in sorted(ck.weight_files, key=lambda p: p.name):
        with open(file, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def describe_reference(ck: Checkpoint, source: str) -> Reference:
    stored = Counter(ref.dtype for ref in ck.tensors.values()).most_common(1)[0][0]
    if stored not in STORED_DTYPES:
        raise CpmkitError(f"{ck.root}: weights are stored as {stored}; a reference must be bf16, fp16 or fp32")
    return Reference(
        source=source, family=ck.spec.family.value, architecture=ck.spec.architecture,
        parameter_count=sum(int(np.prod(ref.shape)) for ref in ck.tensors.values()),
        dtype=STORED_DTYPES[stored], file_size_bytes=sum(f.stat().st_size for f in ck.weight_files),
        content_sha256=weights_sha256(ck))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on ``device`` (host: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def fits_in_memory(device: torch.device, nbytes: int, headroom: float = 2.0) -> bool:
    """Whether ``nbytes`` of weights (times ``headroom`` for activations and copies) fit on ``device``."""
    free = available_memory(device)
    return free is None or nbytes * headroom <= free
