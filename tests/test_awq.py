"""AWQ: the GEMM and GEMV bytes against AutoAWQ 0.2.9's own packers (installed with --no-deps; imported without its
package __init__, which wants the whole training stack), the three layouts reading back to the same model, the
algorithm's pieces, and the quality bar on the trained demo model."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from cpmkit.checkpoint import Checkpoint, demo_path
from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
from cpmkit.convert.registry import FORMATS, artifact_plugin
from cpmkit.errors import CpmkitError
from cpmkit.formats import awq
from cpmkit.quant.awq import candidate_scales, pseudo_quantize, search_clip
from cpmkit.quant.groups import GroupSpec
from cpmkit.testing import build_checkpoint
from cpmkit.verify.run import Verifier
from cpmkit.verify.setup import EvalText


@pytest.fixture(scope="module")
def autoawq(monkeypatch_module):
    """AutoAWQ's WQLinear_GEMM and WQLinear_GEMV, with its package __init__ files skipped."""
    if importlib.util.find_spec("awq") is None:
        pytest.fail("AutoAWQ is not installed: pip install --no-deps autoawq==0.2.9 (see .ci/run)")
    for name in ("awq", "awq.modules", "awq.modules.linear", "awq.utils"):
        spec = importlib.util.find_spec(name)
        stub = types.ModuleType(name)
        stub.__path__ = list(spec.submodule_search_locations)
        monkeypatch_module.setitem(sys.modules, name, stub)
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.modules.linear.gemv import WQLinear_GEMV

    return WQLinear_GEMM, WQLinear_GEMV


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _exact_group_weights(n: int, k: int, group: int, seed: int):
    """Codes, zeros and power-of-two scales, and the weight they make: AutoAWQ re-derives the codes from the
    float16 weight, which is exact only when the products are."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    scales = torch.pow(2.0, -torch.randint(4, 9, (n, k // group), generator=g).float()).half()
    idx = torch.arange(k) // group
    weight = (codes.float() - zeros.float()[:, idx]) * scales.float()[:, idx]
    return codes, zeros, scales, weight.half()


@pytest.mark.parametrize("n, k, group", [(64, 256, 128), (128, 512, 64), (96, 256, 32)])
def test_gemm_and_gemv_bytes_equal_autoawq(autoawq, n, k, group):
    gemm_cls, gemv_cls = autoawq
    codes, zeros, scales, weight = _exact_group_weights(n, k, group, n + k)
    linear = nn.Linear(k, n, bias=False).half()
    linear.weight.data = weight
    theirs = gemm_cls.from_linear(linear, 4, group, False, scales.T.contiguous(), zeros.T.contiguous().half())
    qweight, qzeros = awq.pack_gemm(codes, zeros)
    assert torch.equal(qweight, theirs.qweight) and torch.equal(qzeros, theirs.qzeros)
    assert torch.equal(awq.unpack_gemm(qweight, qzeros)[0], codes)
    theirs = gemv_cls.from_linear(linear, 4, group, False, scales, zeros.half())
    qweight, qzeros, padded = awq.pack_gemv(codes, zeros, scales, group)
    assert torch.equal(qweight, theirs.qweight) and torch.equal(qzeros, theirs.qzeros)
    assert torch.equal(padded, theirs.scales)
    back = awq.unpack_gemv(qweight, qzeros, padded, k // group)
    assert torch.equal(back[0], codes) and torch.equal(back[1], zeros) and torch.equal(back[2], scales)


def test_scale_candidates_and_clipping():
    x_mean, w_mean = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([0.5, 0.5, 1.0])
    s = candidate_scales(x_mean, w_mean, 0.5, duo=True)
    raw = x_mean.sqrt() / (w_mean.sqrt() + 1e-4)
    assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt())
    assert torch.allclose(candidate_scales(x_mean, w_mean, 0.0, duo=False), torch.ones(3))
    # an outlier weight that no input reaches: clipping it lowers the error on what the inputs do reach
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02
    w[:, 5] = 1.0
    x = torch.randn(600, 128, generator=g)
    x[:, 5] = 0
    group = GroupSpec(4, 128, sym=False)
    bound = search_clip(w, x, group)
    assert bool((bound[:, 0, 0] < 1.0).all())
    clipped = torch.clamp(w, -bound[:, 0], bound[:, 0])
    err = lambda q: float(((x @ (pseudo_quantize(q, group) - w).T) ** 2).mean())  # noqa: E731
    assert err(clipped) < 0.5 * err(w)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    ck = Checkpoint.open(build_checkpoint(root / "ck", "minicpm4"))
    out = {}
    for layout in ("gemm", "gemv", "compressed-tensors"):
        target = parse_target("awq:4bit-g64", {"layout": layout, "nsamples": 4, "seqlen": 48})
        out[layout] = FORMATS["awq"].convert(ck, target, root / layout, ConvertContext())
    return ck, out


def test_layouts_hold_the_same_model(layouts):
    ck, out = layouts
    ids = torch.randint(0, ck.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for layout, path in out.items():
        plugin = artifact_plugin(path)
        assert plugin.name == "awq"
        assert plugin.describe(path).variant == {"gemm": "4bit-g64", "gemv": "4bit-g64-gemv",
                                                 "compressed-tensors": "4bit-g64-ct"}[layout]
        with torch.no_grad():
            logits[layout] = plugin.open(path, ck.spec, LoadOptions()).load()(ids)
    assert torch.equal(logits["gemm"], logits["gemv"])
    # compressed-tensors keeps bf16 scales (AutoAWQ float16), so its codes differ here and there
    p, q = logits["gemm"].log_softmax(-1), logits["compressed-tensors"].log_softmax(-1)
    assert 0 < float((p.exp() * (p - q)).sum(-1).mean()) < 0.01


def test_scaled_norms_are_written(layouts):
    from safetensors import safe_open

    ck, out = layouts
    with safe_open(out["gemm"] / "model.safetensors", "pt") as f:
        norm = f.get_tensor("model.layers.0.post_attention_layernorm.weight")
    assert norm.dtype == ck.tensors["model.layers.0.post_attention_layernorm.weight"].dtype
    assert not torch.equal(norm, ck.read("model.layers.0.post_attention_layernorm.weight"))


@pytest.mark.parametrize("variant, options, message", [
    ("awq:3bit-g128", {}, "AutoAWQ's gemm/gemv layouts are 4-bit"),
    ("awq:4bit-g96", {}, "AWQ groups are 32, 64, 128"),
])
def test_refused_targets(variant, options, message):
    with pytest.raises(CpmkitError, match=message):
        parse_target(variant, options)


@pytest.mark.parametrize("bits, layout", [(4, "gemm"), (3, "compressed-tensors")])
def test_awq_beats_round_to_nearest_on_the_demo_model(bits, layout, tmp_path):
    """AWQ's mean KLD below that of round-to-nearest on the same asymmetric grid (calibrated on the built-in
    Shakespeare, scored on the built-in text); bench/awq_quality.py has the full comparison."""
    ck = Checkpoint.open(demo_path())
    verifier = Verifier(ck, "demo", EvalText.load(), ctx=512, chunks=6, device="cpu", cache_dir=tmp_path / "cache")
    awq_target = parse_target(f"awq:{bits}bit-g128", {"nsamples": 16, "layout": layout})
    rtn_target = parse_target(f"gptq:{bits}bit-g128", {"rtn": True, "asym": True})
    kld = {}
    for name, target in (("awq", awq_target), ("rtn", rtn_target)):
        out = FORMATS[target.format].convert(ck, target, tmp_path / name, ConvertContext())
        kld[name] = verifier.measure(out, report_path=name, speed=False).kld.mean
    assert kld["awq"] < kld["rtn"], kld
