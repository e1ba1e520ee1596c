"""The reference's log-probabilities on disk: a ``.npy`` file of float32 ``[windows, scored positions, vocab]``,
written one window at a time as the reference pass produces them and read back one window at a time, so
neither side holds more than a window (MiniCPM4's 73,448-token vocabulary at 40 windows of 512 is 3 GB).

Windows are read with plain file reads rather than a memory map, which would keep every page read so far
mapped into the process for as long as the map lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from cpmkit.atomic import atomic_file

DTYPE = np.dtype("<f4")


def write_logprobs(path: Path, shape: tuple[int, int, int], windows: Iterable[torch.Tensor]) -> None:
    """Write ``windows`` (each float32 ``[1, positions, vocab]`` or ``[positions, vocab]``, in order) as one
    ``.npy`` array of ``shape``, atomically."""
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": DTYPE.str, "fortran_order": False, "shape": shape})
        count = 0
        for window in windows:
            data = window.detach().to("cpu", torch.float32).numpy().reshape(shape[1:])
            f.write(data.astype(DTYPE, copy=False).tobytes())
            count += 1
        assert count == shape[0], (count, shape)


class LogprobFile:
    """Reads windows of a file :func:`write_logprobs` wrote."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ValueError(f"{path}: not an .npy file of a version numpy writes")
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or np.dtype(dtype) != DTYPE or len(shape) != 3:
            raise ValueError(f"{path}: not a float32 [windows, positions, vocab] array")
        self.shape: tuple[int, int, int] = tuple(shape)
        expected = self.offset + int(np.prod(shape)) * DTYPE.itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {expected}")

    @classmethod
    def valid(cls, path: Path, shape: tuple[int, int, int]) -> bool:
        """Whether ``path`` holds a complete array of ``shape`` (a truncated or foreign file does not)."""
        try:
            return path.is_file() and cls(path).shape == tuple(shape)
        except (OSError, ValueError):
            return False

    def window(self, i: int) -> torch.Tensor:
        """float32 ``[1, positions, vocab]`` of window ``i``."""
        per_window = self.shape[1] * self.shape[2]
        data = np.fromfile(self.path, dtype=DTYPE, count=per_window, offset=self.offset + i * per_window * 4)
        return torch.from_numpy(data.reshape(1, *self.shape[1:]))
