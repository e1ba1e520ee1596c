"""Small quantized weights for the kernel tests, each with an independent float32 decoding.

GGUF: ``gguf.quants.quantize`` where gguf-py can quantize the type; K-quants (which it cannot) are
random bytes with sane fp16 ``d``/``dmin``, valid for any decoder. The oracle is
``gguf.quants.dequantize`` (numpy). MLX: ``mx.quantize`` on CPU, oracle ``mx.dequantize`` with float32
scales and biases (the affine product in float32, as MLX's matmul kernels form it).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants as gguf_quants

from cpmkit.formats.gguf.layout import BLOCKS

N, K = 40, 512  # N: one full and one ragged 32-wide tile; K: two super-blocks of 256
# Triton tests run on the GPU where there is one, else under TRITON_INTERPRET (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

GGUF_QUANTIZABLE = (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.TQ1_0, QType.TQ2_0)
GGUF_RANDOM = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
# (bits, group_size, scale dtype): every width, every group size, every scale dtype at least once
MLX_CASES = ((2, 32, "float16"), (3, 64, "bfloat16"), (4, 32, "bfloat16"), (4, 64, "float16"),
             (4, 128, "float32"), (5, 128, "bfloat16"), (6, 64, "float16"), (8, 32, "float32"), (8, 128, "bfloat16"))

CASE_IDS = ([f"gguf-{t.name}" for t in GGUF_QUANTIZABLE + GGUF_RANDOM]
            + [f"mlx-{b}bit-g{g}-{dt}" for b, g, dt in MLX_CASES])


def assert_within(y: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    """``|y - ref| <= rtol * |ref| + atol * rms(ref)`` everywhere (atol scales with the output size)."""
    y, ref = y.float().cpu(), ref.float().cpu()
    err = (y - ref).abs()
    bound = rtol * ref.abs() + atol * ref.pow(2).mean().sqrt()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


def _ternary(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """{-s, 0, +s} per row: what TQ1_0/TQ2_0 are for (BitNet-style weights)."""
    t = torch.randint(-1, 2, (n, k), generator=gen).float()
    return t * (torch.rand(n, 1, generator=gen) * 0.05 + 0.01)


def gguf_weight(qtype: QType, seed: int = 0, n: int = N, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw uint8 ``[n, row_bytes]``, oracle float32 ``[n, k]``)."""
    gen = torch.Generator().manual_seed(seed)
    bl = BLOCKS[qtype]
    if qtype in GGUF_QUANTIZABLE:
        w = _ternary(gen, n, k) if qtype in (QType.TQ1_0, QType.TQ2_0) else torch.randn(n, k, generator=gen) * 0.02
        raw = torch.from_numpy(gguf_quants.quantize(w.numpy(), qtype))
    else:
        blocks = torch.randint(0, 256, (n * k // bl.block_size, bl.type_size), generator=gen, dtype=torch.uint8)
        fields = bl.split_fields(blocks)
        for name in ("d", "dmin"):  # random bytes would give inf/NaN or huge scales
            if name in fields:
                fields[name] = (torch.rand(fields[name].shape, generator=gen) * 2e-3 + 1e-4).half()
        raw = bl.join_fields(fields).reshape(n, -1)
    oracle = torch.from_numpy(gguf_quants.dequantize(raw.numpy(), qtype).astype(np.float32))
    return raw, oracle


def mlx_weight(bits: int, group_size: int, scale_dtype: str, seed: int = 0, n: int = N, k: int = K):
    """(weight uint32 ``[n, k*bits/32]``, scales, biases ``[n, k/group_size]`` of ``scale_dtype``,
    oracle float32 ``[n, k]``)."""
    import mlx.core as mx

    gen = torch.Generator().manual_seed(seed)
    w = mx.array((torch.randn(n, k, generator=gen) * 0.02).numpy()).astype(getattr(mx, scale_dtype))
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
    oracle = torch.from_numpy(np.array(mx.dequantize(wq, s32, b32, group_size=group_size, bits=bits)))
    tdtype = getattr(torch, scale_dtype)
    scales_t, biases_t = (torch.from_numpy(np.array(a)).to(tdtype) for a in (s32, b32))  # exact: scale_dtype values
    return torch.from_numpy(np.array(wq)), scales_t, biases_t, oracle


@functools.cache
def quant_linear_args(case: str) -> tuple[dict, torch.Tensor]:
    """(keyword arguments of ``gguf_linear`` / ``mlx_linear``, oracle) for a CASE_IDS entry."""
    kind, *rest = case.split("-")
    if kind == "gguf":
        qtype = QType[rest[0]]
        raw, oracle = gguf_weight(qtype)
        return {"raw": raw, "qtype": qtype, "shape": (N, K)}, oracle
    bits, group, dtype = int(rest[0].removesuffix("bit")), int(rest[1][1:]), rest[2]
    weight, scales, biases, oracle = mlx_weight(bits, group, dtype)
    return {"weight": weight, "scales": scales, "biases": biases, "bits": bits, "group_size": group}, oracle


def make_linear(case: str, **options):
    from cpmkit.convert.gguf.weight import gguf_linear
    from cpmkit.convert.mlx.weight import mlx_linear

    args, oracle = quant_linear_args(case)
    build = gguf_linear if case.startswith("gguf") else mlx_linear
    return build(**args, **options), oracle
