"""Quantize / dequantize whole tensors to GGUF types: the glue between ``cpmkit.quant`` (codes and
scales) and ``cpmkit.formats.gguf.blocks`` (bytes), producing exactly what llama-quantize writes.

Rows are quantized in chunks of about ``QUANT_CHUNK_ELEMENTS`` weights, each independently (a row's bytes
depend on that row alone), so chunking does not change a byte. ``QuantizeWorkers`` spreads a large
tensor's chunks over worker processes, as llama-quantize splits rows over its threads: the quantizers
issue thousands of small numpy ops per chunk, whose Python overhead holds the GIL, so threads would take
turns rather than run side by side. A 3-D tensor ``(n_expert, rows, cols)`` (MoE ``*_exps``) is quantized
expert by expert, with the expert's slice of the importance matrix, as llama.cpp does.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.blocks import block_type, dequantize
from cpmkit.quant import kquants, legacy, ternary_blocks
from cpmkit.quant.blocks import QuantizedBlocks

Quantizer = Callable[[np.ndarray, "np.ndarray | None"], QuantizedBlocks]

QUANTIZERS: dict[QType, Quantizer] = {**legacy.QUANTIZERS, **kquants.QUANTIZERS, **ternary_blocks.QUANTIZERS}
assert len(QUANTIZERS) == len(legacy.QUANTIZERS) + len(kquants.QUANTIZERS) + len(ternary_blocks.QUANTIZERS)

# Weights per quantizer call: numpy's per-call overhead on the per-group vectors of the K-quant searches
# falls with larger chunks, their float32 temporaries stop fitting in cache with much larger ones; 2**18
# was fastest for every K-quant on this machine's 1 MiB L2 (bench/gguf_quant_throughput.py).
QUANT_CHUNK_ELEMENTS = 1 << 18
# Weights per task sent to a worker process: large enough that pickling and the pipe cost little beside
# the quantization, small enough that the workers finish a tensor at nearly the same time.
TASK_ELEMENTS = 1 << 19
# Types whose quantizer is cheaper than sending the rows to a worker and the bytes back.
IN_PROCESS_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.TQ1_0, QType.TQ2_0)
CAN_FORK = sys.platform.startswith("linux")  # macOS may crash a forked child in system frameworks


def default_workers() -> int:
    """Quantizer processes when the caller names none: torch's thread budget for this process (the CLI's
    global ``--threads`` sets it), at most the CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cpus))


def _quantizer(qtype: QType) -> Quantizer:
    try:
        return QUANTIZERS[qtype]
    except KeyError:
        supported = ", ".join(t.name for t in QUANTIZERS)
        raise CpmkitError(f"cannot quantize to GGUF type {qtype.name}; supported: {supported}") from None


def _portable(rows: torch.Tensor) -> np.ndarray:
    """Rows as a numpy array that pickles cheaply: bf16 as its raw 16-bit patterns (no float32 copy in
    the parent), float16/32/64 as they are, dtypes numpy lacks (float8) as float32."""
    if rows.dtype == torch.bfloat16:
        return rows.contiguous().view(torch.int16).numpy().view(np.uint16)
    if rows.dtype in (torch.float16, torch.float32, torch.float64):
        return rows.contiguous().numpy()
    return rows.to(torch.float32).contiguous().numpy()


def _float32(rows: np.ndarray) -> np.ndarray:
    """``_portable`` rows as contiguous float32, converted exactly like ``tensor.to(torch.float32)``."""
    if rows.dtype == np.uint16:  # bf16 is the top half of a float32
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(rows, dtype=np.float32)


def _quantize_rows(qtype: QType, rows: np.ndarray, qw: np.ndarray | None, name: str, first_row: int) -> np.ndarray:
    """Rows (as ``_portable`` gives them) -> uint8 ``(rows, row_bytes)``, in cache-sized chunks."""
    lay = block_type(qtype).layout
    n_rows, cols = rows.shape
    out = np.empty((n_rows, lay.row_bytes(cols)), dtype=np.uint8)
    step = max(1, QUANT_CHUNK_ELEMENTS // cols)
    for r in range(0, n_rows, step):
        x = _float32(rows[r : r + step])
        if not np.isfinite(x).all():
            raise CpmkitError(f"{name}: contains NaN or Inf (rows {first_row + r}..{first_row + r + x.shape[0] - 1}); "
                              "llama.cpp refuses such data too")
        with np.errstate(all="ignore"):  # the C's float math makes inf/NaN in groups it then masks out
            blocks = QUANTIZERS[qtype](x, qw)
        out[r : r + step] = block_type(qtype).pack(blocks).numpy().reshape(x.shape[0], -1)
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
KEEP_FREED_BYTES = 1 << 30
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 0.5


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (kill -9 included): a worker otherwise waits on
    its task pipe (or blocks writing a result nobody reads) forever, holding its memory. A parent already gone
    by now is caught by the pid check; where prctl is missing or fails, a thread watches the parent instead."""
    try:
        # prctl is variadic: every argument as the unsigned long the kernel reads, or the upper half of the
        # register is whatever was there and the kernel refuses the signal number
        ok = ctypes.CDLL(None, use_errno=True).prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
                                                     ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):  # not Linux
        ok = False
    if os.getppid() != parent:
        os._exit(1)
    if not ok:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _start_worker(parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)  # a worker is one core's share; its packing must not fan out over all of them
    # The searches allocate and free megabyte temporaries thousands of times a second; by default glibc
    # maps and unmaps each one, and the page faults cost as much system time as the arithmetic.
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES // 32)  # glibc caps it at 32 MiB
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    except (OSError, AttributeError):  # not glibc: its allocator, its defaults
        pass


class QuantizeWorkers:
    """Quantizes tensors on ``workers`` processes (``None``: ``default_workers()``; 1, or a platform other
    than Linux: in this process). Use as a context manager, which forks the processes on entry. ``submit``
    returns a tensor's bytes as an iterator over row chunks, in order, while later chunks are still being
    quantized; small tensors and cheap types are quantized in this process."""

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else workers
        if self.workers < 1:
            raise CpmkitError(f"quantizer workers must be at least 1, got {self.workers}")
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> QuantizeWorkers:
        if self.workers > 1 and CAN_FORK:
            # fork now, while this process holds no tensor data: a worker forked later would keep the
            # pages of the tensor being read alive (copy-on-write) after this process frees them
            self._processes().submit(os.getpid).result()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            # after an error or an interrupt nothing more is wanted: queued chunks are cancelled and the workers
            # end after the one in hand, without this thread waiting for them
            self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
            self._pool = None

    def _processes(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # fork, not spawn/forkserver: those re-run the caller's main script in every worker. A forked
            # worker never enters a torch parallel region (one thread), the rule that makes torch's own
            # DataLoader workers safe after the parent has used OpenMP.
            context = multiprocessing.get_context("fork")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                             initargs=(os.getpid(),))
        return self._pool

    def submit(self, w: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None = None,
               name: str = "tensor") -> Iterator[np.ndarray]:
        """Queue ``w`` (as ``quantize_tensor`` takes it) and return an iterator over its bytes: uint8
        ``(rows, row_bytes)`` numpy chunks in row order (3-D: expert after expert). Errors in the data are
        raised when their chunk is reached."""
        _quantizer(qtype)
        lay = block_type(qtype).layout
        if w.dim() not in (2, 3) or not w.is_floating_point():
            raise CpmkitError(f"{name}: expected a 2-D or 3-D float tensor, got {w.dtype} {tuple(w.shape)}")
        cols = w.shape[-1]
        if cols % lay.block_size:
            raise CpmkitError(f"{name}: row length {cols} is not a multiple of the {qtype.name} block size "
                              f"{lay.block_size}; pick another type for this tensor")
        experts = w.shape[0] if w.dim() == 3 else 1
        x = w.detach().reshape(experts, -1, cols)
        qw = None
        if imatrix is not None:
            if imatrix.numel() != experts * cols:
                raise CpmkitError(f"{name}: imatrix has {imatrix.numel()} values, expected {experts * cols} "
                                  f"({experts} x {cols} columns)")
            qw = imatrix.detach().to(torch.float32).reshape(experts, cols).numpy()
            if not np.isfinite(qw).all():
                raise CpmkitError(f"{name}: imatrix contains NaN or Inf (llama-quantize rejects it too)")
        step = max(1, TASK_ELEMENTS // cols)
        tasks = [(qtype, _portable(x[e, r : r + step]), None if qw is None else qw[e], name, r)
                 for e in range(experts) for r in range(0, x.shape[1], step)]
        if self.workers == 1 or len(tasks) == 1 or qtype in IN_PROCESS_TYPES or not CAN_FORK:
            return (_quantize_rows(*task) for task in tasks)
        return _results([self._processes().submit(_quantize_rows, *task) for task in tasks], name)


def _results(futures: list[Future], name: str) -> Iterator[np.ndarray]:
    try:
        for f in futures:
            yield f.result()
    except BrokenProcessPool as e:
        raise CpmkitError(f"{name}: a quantizer worker process died ({e}); out of memory? --threads 1 "
                          "quantizes in the main process") from None
    finally:  # abandoned (an error, or the caller stopped): do not quantize the rest
        for f in futures:
            f.cancel()


def quantize_tensor(w: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None = None,
                    name: str = "tensor", workers: int | None = 1) -> torch.Tensor:
    """Quantize ``w`` ``[rows, cols]`` (or ``[n_expert, rows, cols]``, any float dtype, converted to
    float32 like llama.cpp) along ``cols``; returns uint8 ``[..., rows, row_bytes]``.

    ``imatrix``: per-column importance, ``[cols]`` (``[n_expert * cols]`` or ``[n_expert, cols]`` for
    3-D); selects the imatrix (``_impl``) paths for the types that use it. ``workers``: processes (see
    ``QuantizeWorkers``)."""
    with QuantizeWorkers(workers) as pool:
        chunks = list(pool.submit(w, qtype, imatrix, name))
    row_bytes = block_type(qtype).layout.row_bytes(w.shape[-1])
    out = np.concatenate(chunks) if chunks else np.empty((0, row_bytes), dtype=np.uint8)
    return torch.from_numpy(out).reshape(*w.shape[:-1], row_bytes)


def dequantize_tensor(raw: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 GGUF data -> float32 tensor of ``shape`` (the element shape, last dim = row length)."""
    lay = block_type(qtype).layout
    if not shape or shape[-1] % lay.block_size:
        raise CpmkitError(f"cannot view {qtype.name} data as shape {tuple(shape)}: the row length must be "
                          f"a multiple of {lay.block_size}")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    expected = n_rows * lay.row_bytes(shape[-1])
    if raw.numel() != expected:
        raise CpmkitError(f"{qtype.name} data of {raw.numel()} bytes does not fit shape {tuple(shape)} "
                          f"({expected} bytes)")
    return dequantize(raw.reshape(n_rows, -1), qtype).reshape(shape)
