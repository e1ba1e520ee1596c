"""How fast an artifact runs on one device: each distinct quantized linear (shape and weight type) against
torch's BF16 matmul at a few batch sizes, and whole-model prefill and KV-cache decode throughput.

Measurements are short on purpose (a verify of a shelf of artifacts must stay quick) but repeated, and every
number comes with its spread (interquartile range over median of the repeats), so a measurement taken on a
busy machine says so (``noisy`` in the report) instead of passing for a result. A linear is timed in
alternation with its BF16 twin (quantized, BF16, quantized, ...), so a load that comes and goes hits both
alike and their ratio stays honest. Each timed call is warmed up once (Triton compiles, allocators
settle), then repeated until ``TIMING_BUDGET_S`` has passed (at least ``MIN_REPEATS`` times); decode
throughput is one over the median step time, and on CUDA a step is one CUDA-graph replay of the whole model over
a fixed-shape KV cache (for the BF16 model and the artifact alike), so it measures the GPU, not Python. Inputs are random with a fixed seed (linears) or the
evaluation's first tokens (whole model).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cpmkit.kernels import QuantLinear
from cpmkit.models import CausalLM
from cpmkit.models.layers import StaticKVCache
from cpmkit.models.source import ModelSource
from cpmkit.models.streamed import loaded_parts
from cpmkit.verify.report import LinearSpeed

BATCHES = (1, 16, 256)  # decode, small-batch decode / speculative, prefill-sized
SPEED_DTYPE = torch.bfloat16  # activations (and BF16 baseline weights) in every speed measurement
TIMING_BUDGET_S = 0.1
MIN_REPEATS = 7
MAX_REPEATS = 50
PREFILL_TOKENS = 128
PREFILL_REPEATS = 5
DECODE_TOKENS = 16
DECODE_BUDGET_S = 3.0  # decode stops early past this (CPU dequantizes every weight each step)
MIN_DECODE_TOKENS = 5
SEED = 0


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread: float  # interquartile range / median of the repeats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> Timing:
    """Median (in ms) and relative interquartile range of repeated wall times."""
    median = statistics.median(seconds)
    q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else (median,) * 3
    return Timing(1e3 * median, (q3 - q1) / median if median > 0 else 0.0)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def paired_timings(fns: tuple[Callable[[], object], ...], device: torch.device, *, budget_s: float = TIMING_BUDGET_S,
                   min_repeats: int = MIN_REPEATS) -> tuple[Timing, ...]:
    """Timings of each of ``fns``, called in turn (one round calls each once) after one warm-up round."""
    with torch.no_grad():
        for fn in fns:
            fn()
        _sync(device)
        times: list[list[float]] = [[] for _ in fns]
        start = time.perf_counter()
        while len(times[0]) < min_repeats or (len(times[0]) < MAX_REPEATS
                                              and time.perf_counter() - start < budget_s):
            for fn, seconds in zip(fns, times):
                seconds.append(_timed(fn, device))
    return tuple(summarize(seconds) for seconds in times)


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def linear_speeds(source: ModelSource, device: torch.device) -> tuple[LinearSpeed, ...]:
    """One row per distinct (shape, weight type) of the model's quantized linears and batch size, ordered by
    shape, type and batch; each against a random BF16 weight of its shape, timed in alternation. The model
    is read one part at a time (``loaded_parts``), so a model larger than memory is timed too."""
    rows = []
    for model, _ in loaded_parts(source, device):
        for module in quantized_linears(model).values():
            shape, wtype = (module.out_features, module.in_features), module.fmt.label
            loaded = not any(b.is_meta for b in module.buffers())  # only the current part holds data
            if not loaded or any(row.shape == shape and row.weight_type == wtype for row in rows):
                continue
            gen = torch.Generator().manual_seed(SEED)
            w = torch.randn(shape, generator=gen).to(device, SPEED_DTYPE)
            for batch in BATCHES:
                x = torch.randn(batch, shape[1], generator=gen).to(device, SPEED_DTYPE)
                quant, bf16 = paired_timings((lambda: module(x), lambda: x @ w.T), device)
                rows.append(LinearSpeed.measured(shape, wtype, batch, quant.median_ms, bf16.median_ms,
                                                 max(quant.spread, bf16.spread)))
    return tuple(sorted(rows, key=lambda r: (r.shape, r.weight_type, r.batch)))


def prefill(model: CausalLM, prompt: torch.Tensor) -> Timing:
    """Wall time of one forward over ``prompt`` [1, P], without a cache."""
    return paired_timings((lambda: model(prompt),), prompt.device, min_repeats=PREFILL_REPEATS)[0]


def tokens_per_s(tokens: int, timing: Timing) -> float:
    return tokens / (timing.median_ms / 1e3)


def decode_step_seconds(model: CausalLM, prompt: torch.Tensor, tokens: int) -> list[float]:
    """Wall time of each of ``tokens`` greedy KV-cache decoding steps after ``prompt`` [1, P]
    (:func:`static_decode`: on CUDA each step after the first replays one CUDA graph of the whole model)."""
    return static_decode(model, prompt, tokens, use_graph=prompt.device.type == "cuda")[0]


def static_decode(model: CausalLM, prompt: torch.Tensor, tokens: int, *,
                  use_graph: bool) -> tuple[list[float], list[int]]:
    """Greedy decoding whose step reads its inputs (the token, rope's cos and sin, the cache position) from fixed
    buffers and writes a :class:`StaticKVCache`: with ``use_graph`` (CUDA) the step is captured once as a CUDA
    graph after the first (eager, on a side stream: Triton compiles, packed weights and plans settle) and
    replayed, so a step costs device time rather than Python and launch overhead; without, the same step runs
    eagerly (on CPU). Returns each step's wall time and the tokens."""
    device = prompt.device
    cache = StaticKVCache(prompt.shape[1] + tokens, device)
    times, out = [], []
    with torch.no_grad():
        next_id = model(prompt, cache)[:, -1:].argmax(-1)
        ids = next_id.clone()
        cos, sin = (t.clone() for t in model.rope(cache.length, 1, device))

        def step() -> torch.Tensor:
            return model.head(model.model(ids, cos, sin, cache))

        graph, captured = None, None
        side = torch.cuda.Stream(device) if use_graph else None
        _sync(device)
        for i in range(tokens):
            t0 = time.perf_counter()
            ids.copy_(next_id)
            for buffer, value in zip((cos, sin), model.rope(cache.length, 1, device)):
                buffer.copy_(value)
            if graph is not None:
                graph.replay()
                logits = captured
            elif side is not None:
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    logits = step()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                logits = step()
            next_id = logits[:, -1:].argmax(-1)
            cache.advance(1)
            _sync(device)
            times.append(time.perf_counter() - t0)
            out.append(int(next_id))
            if use_graph and graph is None and i + 1 < tokens:
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        captured = step()
                except RuntimeError as e:  # an op that cannot be captured: time the eager steps instead
                    warnings.warn(f"decode speed: CUDA graph capture failed ({e}); timing eager steps", stacklevel=2)
                    graph, use_graph, side = None, False, None
    return times, out


def decode(model: CausalLM, prompt: torch.Tensor, tokens: int) -> Timing:
    """The median decoding step (throughput is one over it, so one descheduled step does not skew it)."""
    return summarize(decode_step_seconds(model, prompt, tokens))


def decode_length(model: CausalLM, prompt: torch.Tensor) -> int:
    """How many tokens to decode: DECODE_TOKENS, fewer (at least MIN_DECODE_TOKENS) when a step is so slow
    that DECODE_TOKENS would pass DECODE_BUDGET_S. The probe also warms the decode path up."""
    step = min(decode_step_seconds(model, prompt, 2))
    return max(MIN_DECODE_TOKENS, min(DECODE_TOKENS, int(DECODE_BUDGET_S / step)))
