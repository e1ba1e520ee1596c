"""What the dequant-GEMM kernels do per weight on an H100, read from their machine code with no GPU: each kernel
compiled for sm_90 (``cpmkit.kernels.static``) per format and strategy, and its K loop counted.

    python bench/kernels_static.py [--markdown]

Columns: instructions per weight of W in one K-loop iteration (SASS instructions of the loop body per thread,
divided by the weights each thread decodes in it), barriers and shared-memory accesses in that loop, whether
its loads are asynchronous (cp.async/TMA), registers per thread and spilled bytes (``ptxas -v``). bf16
activations. Targets (issue "fast kernels"): the streaming GEMV at batch 1 for Q4_K, MLX 4-bit and GPTQ 4-bit at
most 5 instructions per weight, no barrier in the K loop, no spills.
"""

from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels_static.py compiles real kernels: unset TRITON_INTERPRET")

import triton.language as tl  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402

from cpmkit.convert.gguf.weight import KERNEL_TYPES  # noqa: E402
from cpmkit.convert.mlx.weight import mlx_layout  # noqa: E402
from cpmkit.kernels.gemm_tiled import gemm_kernel  # noqa: E402
from cpmkit.kernels.gemv_splitk import gemv_kernel  # noqa: E402
from cpmkit.kernels.gemv_stream import LANE_COLUMNS, chunk, stream_kernel  # noqa: E402
from cpmkit.kernels.layout import TRIT_BLOCK, AffineLayout  # noqa: E402
from cpmkit.kernels.static import (  # noqa: E402
    compile_for,
    inner_loop,
    layout_constants,
    registers_and_spills,
)
from cpmkit.kernels.trits import trits_kernel  # noqa: E402

TARGET_INSTRUCTIONS = 5.0
TARGETED = ("gguf Q4_K", "mlx 4bit-g64", "gptq 4bit-g128", "gguf TQ1_0")


def formats() -> dict[str, tuple[AffineLayout, str, str]]:
    """name -> (kernel layout, scale pointer type, sub-scale pointer type), as each plug-in packs it."""
    gguf = {f"gguf {t.name}": (KERNEL_TYPES[t].layout, "*fp16", "*i8" if t in (QType.Q3_K, QType.Q6_K) else "*u8")
            for t in (QType.Q4_0, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
                      QType.TQ2_0)}
    return {
        **gguf,
        "mlx 4bit-g64": (mlx_layout(4, 64), "*bf16", "*u8"),
        "mlx 8bit-g64": (mlx_layout(8, 64), "*bf16", "*u8"),
        "gptq 4bit-g128": (AffineLayout(4, 0, 8, 128, 128, False), "*fp16", "*u8"),  # Marlin loads as this
        "gptq 3bit-g128": (AffineLayout(2, 1, 4, 128, 128, False), "*fp16", "*u8"),
        "awq 4bit-g128": (AffineLayout(4, 0, 0, 128, 128, True), "*fp16", "*u8"),
        "ternary row": (AffineLayout(2, 0, 1, 256, 256, False, channel=True), "*bf16", "*u8"),
        "ternary g128": (AffineLayout(2, 0, 1, 128, 128, False), "*bf16", "*u8"),
    }


def signature(lay: AffineLayout, x: str, out: str, d: str, sub: str) -> dict[str, str | None]:
    return {"x_ptr": x, "out_ptr": out, "ws_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "lo_ptr": "*i32", "hi_ptr": "*i32" if lay.hi_bits else None, "d_ptr": d,
            "m_ptr": d if lay.has_m else None, "sub_d_ptr": sub if lay.has_sub else None,
            "sub_m_ptr": "*u8" if lay.has_sub and lay.has_m else None, "lo_mask": "i32", "hi_mask": "i32"}


def strategies(lay: AffineLayout, d: str, sub: str, m: int):
    """(strategy label, compiled kernel, weights per thread per K-loop iteration, trips of a loop nested in it)
    for ``m`` rows of x."""
    warps = 4
    step = chunk(lay, 4096, m)
    stream = compile_for(stream_kernel, signature(lay, "*i32", "*bf16", d, sub),
                         {**layout_constants(lay), "BLOCK_M": m, "BLOCK_N": 32 * LANE_COLUMNS * warps, "CHUNK": step,
                          "SPLIT_K": 4, "NUM_STAGES": 1, "X_PAIRS": True}, num_warps=warps, num_stages=1)
    yield "stream", stream, step * LANE_COLUMNS, 1
    block_n, block_k = 64, 128
    gemv = compile_for(gemv_kernel, signature(lay, "*bf16", "*fp32", d, sub),
                       {**layout_constants(lay), "BLOCK_M": m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": 4},
                       num_warps=warps, num_stages=2)
    yield "gemv_splitk", gemv, block_k * block_n // (32 * warps), 1
    if m == 1:
        tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", UPCAST_DOT=False,
                     GROUP_M=8)
        gemm = compile_for(gemm_kernel, signature(lay, "*bf16", "*bf16", d, sub),
                           {**layout_constants(lay), **tiles, "SPLIT_K": 1}, num_warps=warps, num_stages=3)
        yield "gemm_tiled (M=64 tile)", gemm, 64 * 64 // (32 * warps), 1


def trits_strategies(m: int):
    """TQ1_0 in its stored form (``cpmkit.kernels.trits``): its streaming GEMV, one TQ1_0 block per K step."""
    warps = 4
    sig = {"x_ptr": "*i32", "out_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "qs_ptr": "*i32", "qh_ptr": "*i32", "d_ptr": "*fp16", "byte_lanes": "i32",
           "trit_field": "i32"}
    compiled = compile_for(trits_kernel, sig, dict(BLOCK_M=m, BLOCK_N=32 * LANE_COLUMNS * warps, SPLIT_K=4,
                                                  X_PAIRS=True), num_warps=warps, num_stages=1)
    yield "stream (trits)", compiled, TRIT_BLOCK * LANE_COLUMNS, 3  # the loop over qs's three runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print("| format | strategy | M | instr/weight | barriers | shared ld/st | async loads | registers | spilled B |"
          " target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    missed = []
    for name, (lay, d, sub) in {**formats(), "gguf TQ1_0": (None, "*fp16", None)}.items():
        for m in args.batch:
            runs = trits_strategies(m) if lay is None else strategies(lay, d, sub, m)
            for label, compiled, weights, inner_trips in runs:
                loop = inner_loop(compiled.asm["sass"], inner_trips)
                regs, spilled = registers_and_spills(compiled)
                per_weight = loop.instructions / weights
                verdict = ""
                if label.startswith("stream") and m == 1 and name in TARGETED:
                    ok = per_weight <= TARGET_INSTRUCTIONS and loop.barriers == 0 and spilled == 0
                    verdict = "met" if ok else "MISSED"
                    if not ok:
                        missed.append(name)
                print(f"| {name} | {label} | {m} | {per_weight:.2f} | {loop.barriers} | {loop.shared_accesses} | "
                      f"{'yes' if loop.async_loads else 'no'} | {regs} | {spilled} | {verdict} |", flush=True)
    print(f"\ntargets missed: {', '.join(missed)}" if missed else "\nevery target met")


if __name__ == "__main__":
    main()
