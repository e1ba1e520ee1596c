"""Every dequant-GEMM strategy, every format, against ``x @ W.T`` in float32 with W decoded by an
independent reader (gguf-py, mlx). On CPU the kernels run under TRITON_INTERPRET (tests/conftest.py).

Tolerances, ``|y - ref| <= rtol * |ref| + atol * rms(ref)`` per path:

| path                 | rtol  | atol | why                                                            |
| -------------------- | ----- | ---- | -------------------------------------------------------------- |
| GEMV, GEMM, DEQUANT; fp32 in | 1e-5 | 1e-5 | float32 decode and accumulation; only the summation order differs |
| GEMV; bf16 in        | 2^-7  | 1e-5 | float32 math, output cast to bf16 in the kernel (interpreter: truncated) |
| GEMM; bf16 in        | 2^-7  | 2e-2 | decoded weight rounded to bf16 for the MMA, output cast in the kernel |
| DEQUANT; bf16 in     | 2^-8  | 2e-2 | weight rounded to bf16, torch's bf16 matmul                      |
| STREAM; fp32 in      | 1e-5  | 1e-4 | codes as 1 + q/2^bits: the chunk's sum of x is subtracted back out |
| STREAM; bf16 in      | 2^-7  | 1e-4 | the same, output cast to bf16 in the kernel (interpreter: truncated) |
"""

import pytest
import torch
from gguf import GGMLQuantizationType as QType
from kernel_weights import (
    CASE_IDS,
    DEVICE,
    K,
    N,
    assert_within,
    gguf_weight,
    make_linear,
)

from cpmkit.formats.gguf.layout import BLOCKS
from cpmkit.kernels.dequant import DequantConfig
from cpmkit.kernels.dispatch import (
    DEQUANT_MIN_M,
    Strategy,
    choose_strategy,
    run,
    runs,
)
from cpmkit.kernels.gemm_tiled import GemmConfig, gemm, reference_gemm
from cpmkit.kernels.gemv_splitk import GemvConfig, gemv, reference_gemv
from cpmkit.kernels.gemv_stream import StreamConfig, stream_gemv
from cpmkit.kernels.layout import AffineCodes, AffineLayout, pack_affine
from cpmkit.kernels.splitk import COUNTERS
from cpmkit.kernels.trits import reference_trits

# Tiles smaller than the shapes on purpose: 2 column tiles (the second ragged), 2-way split-K, K tiles
# both smaller than a 256 super-block and larger than a 32 block.
GEMV_TILES = GemvConfig(block_n=32, block_k=64, split_k=2)
GEMM_TILES = GemmConfig(block_m=16, block_n=32, block_k=128, split_k=2)
STREAM_TILES = StreamConfig(num_warps=1, split_k=4, num_stages=1)  # 128 columns: one full tile, one ragged

DEQUANT_TILES = DequantConfig(block_k=64, block_n=32)

TOLERANCES = {  # (strategy, input dtype) -> (rtol, atol as a fraction of rms(ref))
    (Strategy.GEMV, torch.float32): (1e-5, 1e-5),
    (Strategy.GEMM, torch.float32): (1e-5, 1e-5),
    (Strategy.DEQUANT, torch.float32): (1e-5, 1e-5),
    (Strategy.GEMV, torch.bfloat16): (2**-7, 1e-5),
    (Strategy.GEMM, torch.bfloat16): (2**-7, 2e-2),
    (Strategy.DEQUANT, torch.bfloat16): (2**-8, 2e-2),
    (Strategy.STREAM, torch.float32): (1e-5, 1e-4),
    (Strategy.STREAM, torch.bfloat16): (2**-7, 1e-4),
}
TILES = {Strategy.GEMV: GEMV_TILES, Strategy.GEMM: GEMM_TILES, Strategy.STREAM: STREAM_TILES,
         Strategy.DEQUANT: DEQUANT_TILES}
RUNS = {strategy: lambda x, w, s=strategy: run(s, x, w, TILES[s]) for strategy in TILES}
SHAPES = [(Strategy.STREAM, 1, torch.bfloat16), (Strategy.STREAM, 3, torch.float32),
          (Strategy.GEMV, 1, torch.bfloat16), (Strategy.GEMV, 3, torch.float32),
          (Strategy.GEMM, 17, torch.bfloat16), (Strategy.GEMM, 17, torch.float32),
          (Strategy.DEQUANT, 17, torch.bfloat16), (Strategy.DEQUANT, 17, torch.float32)]
TRITS_CASE = "gguf-TQ1_0"  # its stored form runs its own GEMV and the dense path only


@pytest.mark.parametrize("case,strategy,m,dtype", [
    (case, *shape) for case in CASE_IDS for shape in SHAPES
    if case != TRITS_CASE or shape[0] in (Strategy.STREAM, Strategy.DEQUANT)])
def test_kernel_matches_independent_decoder(case, strategy, m, dtype):
    linear, oracle = make_linear(case)
    w = linear.to(DEVICE).packed()
    assert runs(strategy, w, m), "every layout runs the streaming GEMV and the dense path"
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = RUNS[strategy](x.to(DEVICE), w).cpu()
    assert y.dtype == dtype and y.shape == (m, N)
    assert_within(y, x.float() @ oracle.T, *TOLERANCES[strategy, dtype])


def test_trits_gemv_takes_sixteen_rows_four_at_a_time():
    linear, oracle = make_linear(TRITS_CASE)
    x = torch.randn(11, K, generator=torch.Generator().manual_seed(15))
    y = run(Strategy.STREAM, x.to(DEVICE), linear.to(DEVICE).packed(), STREAM_TILES).cpu()
    assert_within(y, x @ oracle.T, *TOLERANCES[Strategy.STREAM, torch.float32])


def test_trits_layout_is_tq1_0_as_stored():
    raw, oracle = gguf_weight(QType.TQ1_0)
    w = make_linear(TRITS_CASE)[0].packed()
    assert w.layout.trits and w.nbytes == raw.numel()  # 1.6875 bits per weight, like the file
    fields = BLOCKS[QType.TQ1_0].split_fields(raw.reshape(-1, BLOCKS[QType.TQ1_0].type_size))
    trits = reference_trits(fields["qs"], fields["qh"]).reshape(N, K)
    assert torch.equal((trits - 1) * fields["d"].float().reshape(N, -1).repeat_interleave(256, dim=1), oracle)


CHANNEL_LAYOUTS = {  # per-output-channel d (and m) applied after the K sum
    "ternary-row": AffineLayout(2, 0, 1, 256, 256, False, channel=True),
    "gptq-4bit-asym-row": AffineLayout(4, 0, 0, 256, 256, True, channel=True),
    "gptq-3bit-row": AffineLayout(2, 1, 4, 128, 128, False, channel=True),
}


@pytest.mark.parametrize("name", CHANNEL_LAYOUTS)
@pytest.mark.parametrize("strategy,m,dtype", [
    (Strategy.STREAM, 1, torch.bfloat16), (Strategy.STREAM, 3, torch.float32), (Strategy.GEMV, 3, torch.float32),
    (Strategy.GEMM, 17, torch.bfloat16), (Strategy.GEMM, 17, torch.float32), (Strategy.DEQUANT, 17, torch.float32),
])
def test_channel_scales_after_the_k_sum(name, strategy, m, dtype):
    lay = CHANNEL_LAYOUTS[name]
    gen = torch.Generator().manual_seed(len(name))
    codes = torch.randint(0, 3 if lay.bits == 2 else 1 << lay.bits, (N, K), dtype=torch.uint8, generator=gen)
    d = (0.01 + 0.05 * torch.rand(N, 1, generator=gen)).to(torch.bfloat16)
    mm = (torch.randn(N, 1, generator=gen) * 0.1).to(torch.bfloat16) if lay.has_m else None
    w = pack_affine([(0, AffineCodes(lay, codes, d, mm, None, None))], lay, N, K)
    assert w.d.shape == (1, N)
    oracle = d.float() * (codes.float() - lay.zero) + (0 if mm is None else mm.float())
    x = torch.randn(m, K, generator=gen).to(dtype)
    y = RUNS[strategy](x.to(DEVICE), w).cpu()
    # the MMA operand is q - zero itself (exact in bf16): no weight rounding, unlike grouped layouts
    rtol, atol = (2**-7, 1e-4) if strategy == Strategy.GEMM else TOLERANCES[strategy, dtype]
    assert_within(y, x.float() @ oracle.T, rtol, atol)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_rows_are_independent(m):
    # every row of a small batch equals the same row computed alone (masking of the padded rows)
    w = make_linear("gguf-Q4_K")[0].to(DEVICE).packed()
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    y = gemv(x, w, GEMV_TILES)
    alone = torch.cat([gemv(x[i : i + 1], w, GEMV_TILES) for i in range(m)])
    torch.testing.assert_close(y, alone, rtol=1e-6, atol=1e-7)


def test_split_k_does_not_change_the_result():
    w = make_linear("gguf-Q6_K")[0].to(DEVICE).packed()
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    whole = gemv(x, w, GemvConfig(block_n=64, block_k=128, split_k=1))
    for split in (2, 3, 4):  # 3 does not divide the 4 K tiles: the last split is short
        torch.testing.assert_close(gemv(x, w, GemvConfig(64, 128, split)), whole, rtol=1e-6, atol=1e-6)


def test_gemm_split_k_is_summed_in_the_kernel_deterministically():
    w = make_linear("mlx-4bit-g64-float16")[0].to(DEVICE).packed()
    x = torch.randn(20, K, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    whole = gemm(x, w, GemmConfig(16, 32, 64, split_k=1))
    for split in (2, 3, 8):
        y = gemm(x, w, GemmConfig(16, 32, 64, split_k=split))
        torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-6)
        assert torch.equal(gemm(x, w, GemmConfig(16, 32, 64, split_k=split)), y)
    assert not COUNTERS.get(x.device, 1).any(), "every arrival counter is left at zero"


def test_references_model_the_kernels():
    linear, oracle = make_linear("mlx-4bit-g64-float16")
    x = torch.randn(17, K, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    w = linear.to(DEVICE).packed()
    y_gemv, y_gemm = gemv(x[:4].to(DEVICE), w, GEMV_TILES).cpu(), gemm(x.to(DEVICE), w, GEMM_TILES).cpu()
    assert_within(y_gemv, reference_gemv(x[:4], oracle).float(), 2**-7, 1e-5)
    assert_within(y_gemm, reference_gemm(x, oracle).float(), 2**-7, 1e-2)


@pytest.mark.parametrize("op", ["dequant_gemv", "dequant_gemm"])
def test_custom_ops_have_working_fakes(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = make_linear("gguf-Q4_0")[0].packed()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, K, dtype=torch.bfloat16)
        args = [x, w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m, 4, 0, 8, 32, 32, False, False]
        tiles = [32, 64, 1, 4, 2] if op == "dequant_gemv" else [16, 32, 64, 1, 8, 4, 3]
        y = getattr(torch.ops.cpmkit, op)(*args, *tiles)
    assert y.shape == (5, N) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("op", ["dequant_gemv", "dequant_gemm"])
def test_custom_ops_compute_what_the_eager_launch_does(op):
    """Eager calls launch the kernels directly; torch.compile goes through the custom ops: same numbers."""
    w = make_linear("gguf-Q4_K")[0].to(DEVICE).packed()
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    lay = w.layout
    args = [x, w.lo, w.hi, w.d, w.m, w.sub_d, w.sub_m, lay.lo_bits, lay.hi_bits, lay.zero, lay.block,
            lay.sub_block, lay.has_m, lay.channel]
    if op == "dequant_gemv":
        eager, tiles = gemv(x, w, GEMV_TILES), [32, 64, 2, 4, 2]
    else:
        eager, tiles = gemm(x, w, GEMM_TILES), [16, 32, 128, 2, 8, 4, 3]
    torch.testing.assert_close(getattr(torch.ops.cpmkit, op)(*args, *tiles), eager, rtol=0, atol=0)


def test_dispatch_rule():
    w = make_linear("gguf-Q4_K")[0].packed()
    assert [choose_strategy(m, w) for m in (1, 4, 5, 8, DEQUANT_MIN_M - 1, DEQUANT_MIN_M)] == [
        Strategy.STREAM, Strategy.STREAM, Strategy.GEMM, Strategy.GEMM, Strategy.GEMM, Strategy.DEQUANT]
    trits = make_linear("gguf-TQ1_0")[0].packed()
    assert [choose_strategy(m, trits) for m in (1, 4, 5, 16, 17)] == [Strategy.STREAM] * 4 + [Strategy.DEQUANT]


@pytest.mark.parametrize("m", [1, 2, 4])
def test_stream_split_k_is_deterministic_and_rows_independent(m):
    w = make_linear("mlx-4bit-g64-float16")[0].to(DEVICE).packed()
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    whole = stream_gemv(x, w, StreamConfig(num_warps=1, split_k=1))
    for split in (2, 8):
        y = stream_gemv(x, w, StreamConfig(num_warps=1, split_k=split))
        torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stream_gemv(x, w, StreamConfig(num_warps=1, split_k=split)), y, rtol=0, atol=0)
    alone = torch.cat([stream_gemv(x[i : i + 1], w, StreamConfig(num_warps=1, split_k=2)) for i in range(m)])
    torch.testing.assert_close(stream_gemv(x, w, StreamConfig(num_warps=1, split_k=2)), alone, rtol=0, atol=0)
