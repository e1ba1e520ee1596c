"""QuantLinear: the torch fallback against independent decoders, the Triton path (interpreter, default
tiles from the dispatcher) against the fallback, caching, state and errors."""

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
    quant_linear_args,
)

from cpmkit.convert.gguf.weight import gguf_linear
from cpmkit.convert.mlx.weight import mlx_linear
from cpmkit.errors import CpmkitError
from cpmkit.kernels import Backend


@pytest.mark.parametrize("case", CASE_IDS)
def test_fallback_matches_independent_decoder(case):
    linear, oracle = make_linear(case, backend=Backend.TORCH)
    torch.testing.assert_close(linear.dequantize(), oracle, rtol=1e-6, atol=0)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0))
    assert_within(linear(x), x @ oracle.T, 1e-5, 1e-6)


@pytest.mark.parametrize("case,m", [("gguf-Q4_K", 1), ("gguf-Q8_0", 5), ("mlx-4bit-g64-float16", 2),
                                    ("gguf-Q6_K", 33), ("mlx-3bit-g64-bfloat16", 20)])
def test_triton_path_matches_fallback(case, m):
    # default tiles from the dispatcher (GEMV for m <= 8, GEMM above), 3-D input, bias
    bias = torch.randn(N, generator=torch.Generator().manual_seed(1))
    triton_linear = make_linear(case, backend=Backend.TRITON, bias=bias)[0].to(DEVICE)
    torch_linear = make_linear(case, backend=Backend.TORCH, bias=bias)[0].to(DEVICE)
    x = torch.randn(m, 1, K, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    y = triton_linear(x)
    assert y.shape == (m, 1, N)
    assert_within(y, torch_linear(x), 1e-5, 1e-5)  # fp32 in: the fp32 rows of TOLERANCES in test_kernels


def test_auto_backend_uses_fallback_on_cpu():
    linear, oracle = make_linear("gguf-Q4_0")
    x = torch.randn(2, K, dtype=torch.bfloat16)
    y = linear(x)
    assert linear._packed is None and y.dtype == torch.bfloat16  # never repacked
    assert_within(y, x.float() @ oracle.T, 2**-8, 1e-5)


def test_cache_dequantized_decodes_once(monkeypatch):
    linear, _ = make_linear("gguf-Q5_K", backend=Backend.TORCH, cache_dequantized=True)
    calls = []
    decode = linear.dequantize
    monkeypatch.setattr(linear, "dequantize", lambda: calls.append(1) or decode())
    x = torch.randn(1, K)
    first = linear(x)
    torch.testing.assert_close(linear(x), first, rtol=0, atol=0)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", [Backend.TORCH, Backend.TRITON])
def test_replaced_or_overwritten_buffers_refresh_the_caches(backend):
    # as a loader does: build on placeholders, then assign the real tensors (or copy into them)
    linear = make_linear("gguf-Q4_K", backend=backend, cache_dequantized=True)[0].to(DEVICE)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(2))
    linear(x.to(DEVICE))
    raw, oracle = gguf_weight(QType.Q4_K, seed=7)
    linear._buffers["raw"] = raw.to(DEVICE)
    assert_within(linear(x.to(DEVICE)), x @ oracle.T, 1e-5, 1e-5)
    raw, oracle = gguf_weight(QType.Q4_K, seed=8)
    linear.load_state_dict({"raw": raw})
    assert_within(linear(x.to(DEVICE)), x @ oracle.T, 1e-5, 1e-5)


def test_buffers_are_the_artifact_tensors():
    args, _ = quant_linear_args("gguf-Q6_K")
    linear = gguf_linear(**args)
    assert list(linear.state_dict()) == ["raw"] and torch.equal(linear.state_dict()["raw"], args["raw"])
    args, _ = quant_linear_args("mlx-5bit-g128-bfloat16")
    linear = mlx_linear(**args)
    assert set(linear.state_dict()) == {"weight", "scales", "biases"}
    assert (linear.in_features, linear.out_features) == (K, N)


def test_errors_name_the_tensor(monkeypatch):
    raw, _ = gguf_weight(QType.Q4_0)
    with pytest.raises(CpmkitError, match="blk.0.attn_q.weight: Q4_0 data"):
        gguf_linear(raw[:, :-2], QType.Q4_0, (N, K), name="blk.0.attn_q.weight")
    with pytest.raises(CpmkitError, match="IQ4_XS has no cpmkit dequant-GEMM kernel"):
        gguf_linear(raw, QType.IQ4_XS, (N, K))
    args, _ = quant_linear_args("mlx-4bit-g64-float16")
    with pytest.raises(CpmkitError, match="bits=7"):
        mlx_linear(**{**args, "bits": 7})
    with pytest.raises(CpmkitError, match="do not fit"):
        mlx_linear(**{**args, "group_size": 32})
    linear = gguf_linear(raw, QType.Q4_0, (N, K), backend=Backend.TRITON, name="lm_head")
    with pytest.raises(CpmkitError, match="lm_head: input of shape"):
        linear(torch.randn(2, K + 32))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(CpmkitError, match="TRITON_INTERPRET=1"):
        linear(torch.randn(2, K))


def test_launch_plans_are_kept_per_layer_and_renewed(monkeypatch):
    """A layer called again with the same batch reuses its strategy and tiles; a new tune cache or new buffers
    choose again."""
    import cpmkit.kernels.dispatch as dispatch

    chosen = []
    real = dispatch.plan
    monkeypatch.setattr(dispatch, "plan", lambda *a: chosen.append(a[1]) or real(*a))
    linear = make_linear("gguf-Q4_K", backend=Backend.TRITON)[0].to(DEVICE)
    x = torch.randn(2, K, device=DEVICE)
    first = linear(x)
    assert torch.equal(linear(x), first) and chosen == [2]
    linear(x[:1])
    assert chosen == [2, 1]
    linear.tune = dispatch.TuneCache("any")
    linear(x)
    assert chosen == [2, 1, 2]
    linear.raw.add_(0)  # written in place: repacked, planned again
    linear(x)
    assert chosen == [2, 1, 2, 2]


def test_fused_projections_run_as_one_launch(monkeypatch):
    """q/k/v-like linears of one layout run as one kernel over their joined weights, with the same outputs as
    one at a time (biases added after the split); differing layouts or a hook fall back to separate calls."""
    import cpmkit.kernels.dispatch as dispatch
    from cpmkit.kernels.linear import fused_forward

    raw_q, _ = gguf_weight(QType.Q4_K, seed=1)
    raw_k, _ = gguf_weight(QType.Q4_K, seed=2, n=8)
    raw_v6, _ = gguf_weight(QType.Q6_K, seed=3, n=8)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(4))
    q = gguf_linear(raw_q, QType.Q4_K, (N, K), backend=Backend.TRITON).to(DEVICE)
    k = gguf_linear(raw_k, QType.Q4_K, (8, K), backend=Backend.TRITON, bias=bias).to(DEVICE)
    v6 = gguf_linear(raw_v6, QType.Q6_K, (8, K), backend=Backend.TRITON).to(DEVICE)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    separate = [q(x), k(x)]
    launches = []
    real = dispatch.quant_matmul
    monkeypatch.setattr(dispatch, "quant_matmul", lambda x, w, *a: launches.append(w.n) or real(x, w, *a))
    fused = fused_forward(x, q, k)
    assert launches == [N + 8] and q._packed is None and k._packed is None  # one joined copy, not three
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    launches.clear()
    mixed = fused_forward(x, q, k, v6)
    assert launches == [N, 8, 8] and torch.equal(mixed[2], v6(x))
    launches.clear()
    handle = k.register_forward_hook(lambda *args: None)
    fused_forward(x, q, k)
    assert launches == [N, 8]
    handle.remove()


@pytest.mark.parametrize("variant", ["minicpm4-0.5b", "minicpm3"])
def test_a_model_on_the_kernels_runs_joined_projections(variant, tmp_path, monkeypatch):
    """A whole artifact on the Triton path (q/k/v, gate/up and MiniCPM3's q_a/kv_a joined) gives the torch
    path's logits."""
    import cpmkit.kernels.dispatch as dispatch
    from cpmkit.checkpoint import Checkpoint
    from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
    from cpmkit.convert.registry import FORMATS
    from cpmkit.testing import build_checkpoint

    ck = Checkpoint.open(build_checkpoint(tmp_path / "ck", variant))
    target = parse_target("mlx:4bit-g32")
    out = FORMATS["mlx"].convert(ck, target, tmp_path / "mlx", ConvertContext())
    widths = []
    real = dispatch.quant_matmul
    monkeypatch.setattr(dispatch, "quant_matmul", lambda x, w, *a: widths.append(w.n) or real(x, w, *a))
    ids = torch.randint(0, ck.spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        kernels = FORMATS["mlx"].open(out, ck.spec, LoadOptions(backend="triton")).load()(ids)
        reference = FORMATS["mlx"].open(out, ck.spec, LoadOptions(backend="torch")).load()(ids)
    torch.testing.assert_close(kernels, reference, rtol=1e-3, atol=1e-3)
    spec = ck.spec
    assert 2 * spec.intermediate_size in widths, "gate and up ran as one launch"
    if spec.mla is None:
        assert (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim in widths, "q, k and v ran as one launch"
    else:
        assert spec.mla.q_lora_rank + spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim in widths
