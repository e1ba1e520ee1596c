"""How fast an artifact runs on one device: each distinct quantized linear (shape and weight type) against
torch's BF16 matmul at a few batch sizes, and whole-model prefill and KV-cache decode throughput.

Measurements are short on purpose (a verify of a shelf of artifacts must stay quick): each timed call is
warmed up once (Triton compiles, allocators settle), then repeated until ``TIMING_BUDGET_S`` has passed
(at least ``MIN_REPEATS`` times), and the median is kept; decode throughput is one over the median step
time. Inputs are random with a fixed seed (linears) or the evaluation's first tokens (whole model).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from cpmkit.kernels import QuantLinear
from cpmkit.models import CausalLM, KVCache
from cpmkit.verify.artifacts import quantized_linears
from cpmkit.verify.report import LinearSpeed

BATCHES = (1, 16, 256)  # decode, small-batch decode / speculative, prefill-sized
SPEED_DTYPE = torch.bfloat16  # activations (and BF16 baseline weights) in every speed measurement
TIMING_BUDGET_S = 0.05
MIN_REPEATS = 5
MAX_REPEATS = 50
PREFILL_TOKENS = 128
PREFILL_REPEATS = 3
DECODE_TOKENS = 16
DECODE_BUDGET_S = 3.0  # decode stops early past this (CPU dequantizes every weight each step)
MIN_DECODE_TOKENS = 4
SEED = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, budget_s: float = TIMING_BUDGET_S,
              min_repeats: int = MIN_REPEATS) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    with torch.no_grad():
        fn()
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_repeats or (len(times) < MAX_REPEATS and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


class Bf16Matmul:
    """``x @ W.T`` latency in BF16 on one device, measured once per (shape, batch) and reused for every
    artifact of a session."""

    def __init__(self, device: torch.device):
        self.device = device
        self._ms: dict[tuple[tuple[int, int], int], float] = {}

    def ms(self, shape: tuple[int, int], batch: int) -> float:
        key = (shape, batch)
        if key not in self._ms:
            gen = torch.Generator().manual_seed(SEED)
            w = torch.randn(shape, generator=gen).to(self.device, SPEED_DTYPE)
            x = torch.randn(batch, shape[1], generator=gen).to(self.device, SPEED_DTYPE)
            self._ms[key] = median_ms(lambda: x @ w.T, self.device)
        return self._ms[key]


def linear_speeds(model: CausalLM, weight_type: Callable[[QuantLinear], str], device: torch.device,
                  bf16: Bf16Matmul) -> tuple[LinearSpeed, ...]:
    """One row per distinct (shape, weight type) of the model's quantized linears and batch size, ordered by
    shape, type and batch."""
    distinct: dict[tuple[tuple[int, int], str], QuantLinear] = {}
    for module in quantized_linears(model).values():
        distinct.setdefault(((module.out_features, module.in_features), weight_type(module)), module)
    rows = []
    for (shape, wtype), module in sorted(distinct.items()):
        for batch in BATCHES:
            x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(SEED)).to(device, SPEED_DTYPE)
            quant = median_ms(lambda: module(x), device)
            rows.append(LinearSpeed.measured(shape, wtype, batch, quant, bf16.ms(shape, batch)))
    return tuple(rows)


def prefill_tok_s(model: CausalLM, prompt: torch.Tensor) -> float:
    """Tokens per second of one forward over ``prompt`` [1, P], without a cache."""
    ms = median_ms(lambda: model(prompt), prompt.device, min_repeats=PREFILL_REPEATS)
    return prompt.shape[1] / (ms / 1e3)


def decode_step_seconds(model: CausalLM, prompt: torch.Tensor, tokens: int) -> list[float]:
    """Wall time of each of ``tokens`` greedy KV-cache decoding steps after ``prompt`` [1, P]."""
    device = prompt.device
    times = []
    with torch.no_grad():
        cache = KVCache()
        next_id = model(prompt, cache)[:, -1:].argmax(-1)
        _sync(device)
        for _ in range(tokens):
            t0 = time.perf_counter()
            next_id = model(next_id, cache)[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def decode_tok_s(model: CausalLM, prompt: torch.Tensor, tokens: int) -> float:
    """Decode throughput: 1 / the median step time, so one descheduled step does not skew it."""
    return 1.0 / statistics.median(decode_step_seconds(model, prompt, tokens))


def decode_length(model: CausalLM, prompt: torch.Tensor) -> int:
    """How many tokens to decode: DECODE_TOKENS, fewer (at least MIN_DECODE_TOKENS) when a step is so slow
    that DECODE_TOKENS would pass DECODE_BUDGET_S. The probe also warms the decode path up."""
    step = min(decode_step_seconds(model, prompt, 2))
    return max(MIN_DECODE_TOKENS, min(DECODE_TOKENS, int(DECODE_BUDGET_S / step)))
