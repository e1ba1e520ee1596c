"""Which dequant-GEMM strategy and tile configuration runs a given call, and autotuning.

The rule: ``M <= STREAM_MAX_M`` runs the streaming GEMV (every layout whose scale groups hold whole code
words; TQ1_0's stored form has its own, ``cpmkit.kernels.trits``), ``M >= DEQUANT_MIN_M`` the dense path
(dequantize, then cuBLAS), the rest the tiled tensor-core GEMM with split-K. The split-K GEMV is only an
autotune candidate: compiled for sm_90 at M = 8 it takes 22-28 instructions per weight and 14-20 barriers a K
step, the GEMM with 16-row tiles 8-14 and 2-6 (``bench/kernels_static.py``). A trits layout has only its GEMV and
the dense path.
A :class:`TuneCache` entry measured for the same layout, shape bucket and dtype overrides both the
strategy and the tiles, so the crossover is measured per format and shape where a cache exists. Configs
are always explicit arguments: nothing is read at import and no state is global; a cache is an object
the caller loads (``TuneCache.load``) and passes in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Union

import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

from cpmkit.errors import CpmkitError
from cpmkit.kernels.dequant import DequantConfig, dequant_matmul
from cpmkit.kernels.gemm_tiled import GemmConfig, gemm
from cpmkit.kernels.gemv_splitk import MAX_M as GEMV_KERNEL_MAX_M
from cpmkit.kernels.gemv_splitk import GemvConfig, gemv
from cpmkit.kernels.gemv_stream import MAX_M as STREAM_MAX_M
from cpmkit.kernels.gemv_stream import (
    StreamConfig,
    default_stream_config,
    k_steps,
    stream_gemv,
    supports,
)
from cpmkit.kernels.layout import PackedWeight, pow2_divisor
from cpmkit.kernels.timing import device_ms
from cpmkit.kernels.trits import TRITS_MAX_M, trits_gemv

# From where the dense path is the default: an estimate for an H100 (MiniCPM4-8B's 4096 x 4096 at M = 1024: the
# bf16 matmul about 50 us, the decode's pass over the weights about 12 us; the tiled GEMM measured 0.33-0.57x
# BF16 at M = 256). An autotune cache replaces it with a measurement.
DEQUANT_MIN_M = 1024
# Programs to aim for when choosing split-K on an H100 (132 SMs): two waves for the tiled GEMM; eight for
# the GEMV, whose programs each stream a thin column of weights (measured at batch 1 on MiniCPM4-8B
# shapes: 2 waves 1.14-1.17x over BF16 for Q4_K, 8 waves 1.34-1.59x, 32 waves 1.29-1.33x).
TARGET_PROGRAMS = 264
GEMV_TARGET_PROGRAMS = 1056
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_OFFSET = 2**31  # the kernels index x and the output with int32 offsets

Config = Union[StreamConfig, GemvConfig, GemmConfig, DequantConfig]


class Strategy(str, Enum):
    STREAM = "gemv_stream"
    GEMV = "gemv_splitk"
    GEMM = "gemm_tiled"
    DEQUANT = "dequant_matmul"


def _stream(x2d: torch.Tensor, w: PackedWeight, cfg: StreamConfig) -> torch.Tensor:
    return trits_gemv(x2d, w, cfg) if w.layout.trits else stream_gemv(x2d, w, cfg)


_RUNNERS: dict[Strategy, tuple[Callable[[torch.Tensor, PackedWeight, Config], torch.Tensor], type]] = {
    Strategy.STREAM: (_stream, StreamConfig),
    Strategy.GEMV: (gemv, GemvConfig),
    Strategy.GEMM: (gemm, GemmConfig),
    Strategy.DEQUANT: (dequant_matmul, DequantConfig),
}


def runs(strategy: Strategy, w: PackedWeight, m: int) -> bool:
    """Whether ``strategy`` can run ``m`` rows against ``w`` (its kernel decodes the layout and holds M rows)."""
    if strategy == Strategy.STREAM:
        return m <= TRITS_MAX_M if w.layout.trits else m <= STREAM_MAX_M and supports(w)
    if strategy == Strategy.DEQUANT:
        return True
    return not w.layout.trits and (strategy == Strategy.GEMM or m <= GEMV_KERNEL_MAX_M)


def choose_strategy(m: int, w: PackedWeight) -> Strategy:
    """The default strategy for ``m`` rows against ``w`` (whose layout decides which kernels can run it)."""
    if runs(Strategy.STREAM, w, m):
        return Strategy.STREAM
    return Strategy.DEQUANT if w.layout.trits or m >= DEQUANT_MIN_M else Strategy.GEMM


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def _split_k(tiles: int, k_tiles: int, most: int, target: int = TARGET_PROGRAMS) -> int:
    return _pow2_floor(min(max(target // tiles, 1), k_tiles, most))


def default_config(strategy: Strategy, m: int, n: int, k: int, w: PackedWeight | None = None) -> Config:
    """Untuned tiles that are valid for every layout and reasonable on an H100 (``w``: needed for STREAM)."""
    if strategy == Strategy.STREAM:
        assert w is not None
        return default_stream_config(n, k, w, GEMV_TARGET_PROGRAMS, m)
    if strategy == Strategy.DEQUANT:
        return DequantConfig(block_k=pow2_divisor(k, 64, 32))
    if strategy == Strategy.GEMV:
        # keep BLOCK_M * BLOCK_K * BLOCK_N (the product held in registers) at 16K elements
        block_n = 32 if n <= 1024 else 64
        block_k = pow2_divisor(k, max(32, 256 // triton.next_power_of_2(m)), 32)
        split = _split_k(triton.cdiv(n, block_n), k // block_k, k // block_k, GEMV_TARGET_PROGRAMS)
        return GemvConfig(block_n=block_n, block_k=block_k, split_k=split)
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 128 if n >= 2048 and block_m >= 64 else 64
    block_k = pow2_divisor(k, 64, 32)
    split = _split_k(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k // block_k, 8)
    return GemmConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split,
                      num_warps=8 if block_m * block_n >= 128 * 128 else 4)


def candidate_configs(strategy: Strategy, m: int, n: int, k: int, w: PackedWeight | None = None) -> list[Config]:
    """The autotune search space for one strategy and shape (valid tiles only; ``w``: needed for STREAM)."""
    out: list[Config] = []
    if strategy == Strategy.STREAM:
        assert w is not None
        chunks = k_steps(w.layout, k, triton.next_power_of_2(min(m, STREAM_MAX_M)))
        stages = (1,) if w.layout.trits else (1, 3)  # the trits GEMV's loop is not pipelined
        return [StreamConfig(warps, split, stage) for warps in (1, 2, 4) for split in (1, 2, 4, 8, 16, 32)
                for stage in stages if split <= chunks]
    if strategy == Strategy.DEQUANT:
        if w is not None and w.layout.trits:  # one TQ1_0 block a program: the tiles are fixed
            return [DequantConfig()]
        return [DequantConfig(block_k, block_n, warps) for block_k in (32, 64) for block_n in (64, 128, 256)
                for warps in (4, 8) if k % block_k == 0]
    if strategy == Strategy.GEMV:
        bm = triton.next_power_of_2(m)
        for block_n in (32, 64, 128):
            for block_k in (32, 64, 128, 256, 512):
                if k % block_k or bm * block_k * block_n > 32768 or block_k * block_n < 2048:
                    continue
                for split in (1, 2, 4, 8, 16):
                    if split <= k // block_k:
                        out += [GemvConfig(block_n, block_k, split, warps, 2) for warps in (2, 4)]
        return out
    for block_m, block_n, block_k, warps, stages in (
        (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (32, 64, 128, 4, 3), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
    ):
        if k % block_k or block_m > max(16, triton.next_power_of_2(m)):
            continue
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        for split in (1, 2, 4, 8):
            if split == 1 or (tiles * split <= 2 * TARGET_PROGRAMS and split <= k // block_k // 4):
                out.append(GemmConfig(block_m, block_n, block_k, split, 8, warps, stages))
    return out


def tune_key(w: PackedWeight, m: int, dtype: torch.dtype) -> str:
    return f"{w.layout.key()}|m={triton.next_power_of_2(m)}|n={w.n}|k={w.k}|{str(dtype).removeprefix('torch.')}"


@dataclass
class TuneCache:
    """Measured best (strategy, config) per :func:`tune_key`, for one GPU model; JSON on disk."""

    device: str
    entries: dict[str, tuple[Strategy, Config]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, device: str) -> TuneCache:
        """Read ``path`` (an empty cache if it does not exist); it must have been tuned on ``device``."""
        if not path.exists():
            return cls(device)
        data = json.loads(path.read_text())
        if data.get("device") != device:
            raise CpmkitError(f"{path}: autotune cache was measured on {data.get('device')!r}, not {device!r}; "
                              "use a cache file per GPU model")
        entries = {}
        for key, e in data["entries"].items():
            strategy = Strategy(e["strategy"])
            entries[key] = (strategy, _RUNNERS[strategy][1](**e["config"]))
        return cls(device, entries)

    def save(self, path: Path) -> None:
        data = {"device": self.device,
                "entries": {key: {"strategy": s.value, "config": asdict(c)} for key, (s, c) in self.entries.items()}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)


def plan(w: PackedWeight, m: int, dtype: torch.dtype, tune: TuneCache | None = None) -> tuple[Strategy, Config]:
    """The strategy and tiles :func:`quant_matmul` uses for ``M = m`` rows of ``dtype``."""
    entry = tune.entries.get(tune_key(w, m, dtype)) if tune is not None else None
    if entry is not None:
        return entry
    strategy = choose_strategy(m, w)
    return strategy, default_config(strategy, m, w.n, w.k, w)


def run(strategy: Strategy, x2d: torch.Tensor, w: PackedWeight, cfg: Config) -> torch.Tensor:
    return _RUNNERS[strategy][0](x2d, w, cfg)


PLANS_KEPT = 64  # plans a layer keeps (distinct batch sizes); more are computed again


def quant_matmul(x: torch.Tensor, w: PackedWeight, tune: TuneCache | None = None,
                 plans: dict | None = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16/fp32) times ``dequant(w).T`` -> ``[..., N]`` in x's dtype, on Triton.
    ``plans``: the caller's dict of plans by (rows, dtype), filled on first use, so that a layer called again
    with the same batch skips choosing its strategy and tiles (the caller clears it when w or tune change)."""
    if x.dtype not in ACTIVATION_DTYPES or x.shape[-1] != w.k:
        raise CpmkitError(f"dequant matmul: input {x.dtype} {tuple(x.shape)} does not fit a {w.n}x{w.k} weight; "
                          "expected float32/float16/bfloat16 with last dimension K")
    x2d = x.reshape(-1, w.k)
    if w.perm is not None:
        x2d = x2d.index_select(1, w.perm.to(x2d.device))
    if x2d.stride(1) != 1:  # the kernels read K-contiguous rows
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], w.n))
    if max(m * x2d.stride(0), m * w.n) >= MAX_OFFSET:
        raise CpmkitError(f"dequant matmul: {m} rows of a {w.n}x{w.k} weight exceed int32 offsets; split the batch")
    chosen = None if plans is None else plans.get((m, x.dtype))
    if chosen is None:
        chosen = plan(w, m, x.dtype, tune)
        if plans is not None and len(plans) < PLANS_KEPT:
            plans[(m, x.dtype)] = chosen
    strategy, cfg = chosen
    return run(strategy, x2d, w, cfg).reshape(*x.shape[:-1], w.n)


def autotune(x2d: torch.Tensor, w: PackedWeight, tune: TuneCache,
             strategies: tuple[Strategy, ...] = tuple(Strategy)) -> tuple[Strategy, Config, float]:
    """Time every candidate of ``strategies`` on CUDA (device time, ``timing.device_ms``) and record the
    fastest in ``tune``.

    Returns (strategy, config, milliseconds). Configs that exceed the GPU's shared memory or registers
    (or that ptxas rejects) are skipped; any other failure propagates.
    """
    m = x2d.shape[0]
    best: tuple[Strategy, Config, float] | None = None
    for strategy in strategies:
        if not runs(strategy, w, m):  # the tuner may find a strategy wins beyond the default rule
            continue
        for cfg in candidate_configs(strategy, m, w.n, w.k, w):
            try:
                ms = device_ms(lambda s=strategy, c=cfg: run(s, x2d, w, c))
            except (OutOfResources, PTXASError):
                continue
            if best is None or ms < best[2]:
                best = (strategy, cfg, ms)
    if best is None:
        raise CpmkitError(f"autotune: no candidate config fits the GPU for a {w.n}x{w.k} weight at M={m}")
    tune.entries[tune_key(w, m, x2d.dtype)] = best[:2]
    return best
