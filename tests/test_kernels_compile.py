"""Compile the kernels for an H100 (sm_90) without a GPU: catches what the interpreter cannot (layout
lowering, ``tl.dot`` operand rules, ptxas). Runs this file as a script in a subprocess, because the
kernels must be imported without TRITON_INTERPRET, which tests/conftest.py sets on CPU machines."""

import os
import subprocess
import sys

import pytest
import torch

SM_90 = 90


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels for real in test_kernels.py")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("compiled") == 19, done.stdout


def _compile_all() -> None:
    import triton.language as tl
    from gguf import GGMLQuantizationType as QType

    from cpmkit.convert.gguf.weight import KERNEL_TYPES as GGUF_KERNEL_TYPES
    from cpmkit.convert.mlx.weight import mlx_layout
    from cpmkit.kernels.dequant import dequant_kernel
    from cpmkit.kernels.gemm_tiled import gemm_kernel
    from cpmkit.kernels.gemv_splitk import gemv_kernel
    from cpmkit.kernels.gemv_stream import chunk, stream_kernel
    from cpmkit.kernels.static import compile_for, layout_constants
    from cpmkit.kernels.trits import trits_dequant_kernel, trits_kernel

    def compile_kernel(kernel, act: str, lay, d: str, sub: str, constants: dict, split: int) -> None:
        ptr = {"bf16": "*bf16", "fp32": "*fp32", "pairs": "*i32"}[act]
        sig = {"x_ptr": ptr, "out_ptr": "*fp32" if split > 1 and kernel is not stream_kernel else ptr,
               "ws_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "i32", "lo_ptr": "*i32", "hi_ptr": "*i32" if lay.hi_bits else None, "d_ptr": d,
               "m_ptr": d if lay.has_m else None, "sub_d_ptr": sub if lay.has_sub else None,
               "sub_m_ptr": "*u8" if lay.has_sub and lay.has_m else None, "lo_mask": "i32", "hi_mask": "i32"}
        if act == "pairs":
            sig["out_ptr"] = "*bf16"
        compile_for(kernel, sig, {**layout_constants(lay), "SPLIT_K": split, **constants})
        print("compiled", kernel.__name__, act, lay, flush=True)

    gguf = {t: GGUF_KERNEL_TYPES[t].layout for t in (QType.Q4_K, QType.Q6_K, QType.Q8_0)}
    cases = [(gguf[QType.Q4_K], "*fp16", "*u8"), (gguf[QType.Q6_K], "*fp16", "*i8"),
             (gguf[QType.Q8_0], "*fp16", "*u8"), (mlx_layout(3, 64), "*bf16", "*u8")]
    for lay, d, sub in cases:
        compile_kernel(gemv_kernel, "bf16", lay, d, sub, dict(BLOCK_M=2, BLOCK_N=64, BLOCK_K=128), split=4)
        act = "fp32" if lay.lo_bits == 8 else "bf16"
        dot = dict(DOT_DTYPE=tl.float32 if act == "fp32" else tl.bfloat16,
                   DOT_PRECISION="ieee" if act == "fp32" else "tf32", UPCAST_DOT=False, GROUP_M=8)
        compile_kernel(gemm_kernel, act, lay, d, sub, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, **dot), split=1)
        stream = dict(BLOCK_M=4 if act == "fp32" else 1, BLOCK_N=512, NUM_STAGES=1,
                      CHUNK=chunk(lay, 4096, 4 if act == "fp32" else 1),
                      X_PAIRS=act == "bf16")
        compile_kernel(stream_kernel, "pairs" if act == "bf16" else act, lay, d, sub, stream, split=4)
        dense = {"out_ptr": "*bf16", "N": "i32", "lo_ptr": "*i32", "hi_ptr": "*i32" if lay.hi_bits else None,
                 "d_ptr": d, "m_ptr": d if lay.has_m else None, "sub_d_ptr": sub if lay.has_sub else None,
                 "sub_m_ptr": "*u8" if lay.has_sub and lay.has_m else None}
        compile_for(dequant_kernel, dense, {**layout_constants(lay), "BLOCK_K": 64, "BLOCK_N": 128})
        print("compiled dequant_kernel", lay, flush=True)

    trits = {"x_ptr": "*i32", "out_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32",
             "K": "i32", "stride_xm": "i32", "qs_ptr": "*i32", "qh_ptr": "*i32", "d_ptr": "*fp16",
             "byte_lanes": "i32", "trit_field": "i32"}
    for m in (1, 4):
        compile_for(trits_kernel, trits, dict(BLOCK_M=m, BLOCK_N=512, SPLIT_K=4, X_PAIRS=True))
        print("compiled trits_kernel", m, flush=True)
    compile_for(trits_dequant_kernel, {"out_ptr": "*bf16", "N": "i32", "qs_ptr": "*i32", "qh_ptr": "*i32",
                                       "d_ptr": "*fp16"}, dict(BLOCK_N=64))
    print("compiled trits_dequant_kernel", flush=True)


if __name__ == "__main__":
    _compile_all()
