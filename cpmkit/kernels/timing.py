"""Device time of a GPU call, without the host's share.

``triton.testing.do_bench`` times each call between CUDA events recorded from the host, so a call whose
Python and launch work outlasts its kernels (most dequant GEMVs: 5-50 us of kernel) is timed by its host
overhead. Here ``reps`` calls, each after an L2 flush (weights come from HBM, as in a real forward), are
captured in one CUDA graph and replayed; the same graph of flushes alone is subtracted.
"""

from __future__ import annotations

from typing import Callable

import torch

FLUSH_BYTES = 256 << 20  # several times any GPU's L2
REPLAYS = 5  # the median replay counts


def device_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Milliseconds of device time per call of ``fn`` (CUDA; ``fn`` is called once first, uncaptured, so
    compilation and allocation happen outside the graph)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with_fn, flush_only = _capture(fn, flush, reps), _capture(lambda: None, flush, reps)
    return max(0.0, _replay_ms(with_fn) - _replay_ms(flush_only)) / reps


def _capture(fn: Callable[[], object], flush: torch.Tensor, reps: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            flush.zero_()
            fn()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
