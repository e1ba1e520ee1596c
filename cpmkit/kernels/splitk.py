"""Split-K partial sums added inside the kernel, deterministically: every split of an output tile stores its
float32 slice, then bumps the tile's arrival counter (acq_rel); the split that arrives last adds the slices in
split order, writes the result in the output's dtype and sets the counter back to zero. No second kernel, no
host-side sum, and the same bits whatever order the splits ran in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class Counters:
    """One zeroed int32 arrival counter per output tile, per device; each kernel leaves them zero again.
    Calls that overlap (two CUDA streams) would share them, so split-K kernels are for one stream at a time.
    A larger set replaces a smaller one without freeing it: a CUDA graph captured earlier keeps its pointer."""

    def __init__(self):
        self._by_device: dict[torch.device, list[torch.Tensor]] = {}

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        held = self._by_device.setdefault(device, [])
        if not held or held[-1].numel() < n:
            held.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
        return held[-1]


COUNTERS = Counters()


@triton.jit
def store_tile(out_ptr, ws_ptr, count_ptr, acc, offs_m, offs_n, M, N, tile, pid_k, SPLIT_K: tl.constexpr):
    """Write ``acc [BLOCK_M, BLOCK_N]`` at rows ``offs_m``, columns ``offs_n`` of ``out [M, N]``; with split-K
    through ``ws [SPLIT_K, M, N]`` (float32) and counter ``tile``."""
    here = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * M * N + here, acc, mask=mask)
        # every warp's slice is written before one thread announces it (the atomic's release covers its own
        # thread; the barrier orders the others' stores before it)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + here, mask=mask, other=0, cache_modifier=".cg")
            tl.store(out_ptr + here, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)


def outputs(x: torch.Tensor, n: int, split_k: int, tiles: int):
    """(out ``[M, N]`` in x's dtype, the float32 slices (out itself without split-K), the counters)."""
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if split_k == 1:
        return out, out, out  # the kernel reads neither
    ws = torch.empty((split_k, x.shape[0], n), dtype=torch.float32, device=x.device)
    return out, ws, COUNTERS.get(x.device, tiles)
