"""The ternary pack: bytes, exact round trips of BitCPM-style fixtures at every granularity, refusals, absmean
PTQ, and the kernel against the format's own dequantization."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cpmkit.checkpoint import Checkpoint
from cpmkit.cli import cli
from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
from cpmkit.convert.registry import FORMATS
from cpmkit.convert.ternary.weight import BitNetWeight, TernaryPackWeight
from cpmkit.errors import CpmkitError
from cpmkit.formats import bitnet, ternary
from cpmkit.formats.safetensors import index_folder
from cpmkit.kernels import Backend, QuantLinear
from cpmkit.quant.ternary import TernaryGranularity, absmean_ternary, exact_ternary
from cpmkit.testing import build_checkpoint

GRANULARITIES = {"tensor": -1, "row": -1, "group128": 128, "group64": 64, "group32": 32}


def test_codes_pack_four_per_byte_low_bits_first():
    codes = torch.tensor([[0, 1, 2, 1, 2, 2, 0, 0]], dtype=torch.uint8)
    packed = ternary.pack_codes(codes)
    assert packed.tolist() == [[0b01_10_01_00, 0b00_00_10_10]]
    assert torch.equal(ternary.unpack_codes(packed), codes)
    many = torch.randint(0, 3, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ternary.unpack_codes(ternary.pack_codes(many)), many)


@pytest.fixture(scope="module", params=list(GRANULARITIES))
def packed_fixture(request, tmp_path_factory):
    """A BitCPM-shaped fixture ternary at one granularity, and its pack."""
    root = tmp_path_factory.mktemp(request.param)
    source = build_checkpoint(root / "BitCPM4-0.5B", "bitcpm4", ternary=request.param)
    out = FORMATS["ternary"].convert(Checkpoint.open(source), parse_target("ternary"), root / "pack", ConvertContext())
    return request.param, source, out


def test_every_granularity_round_trips_bit_for_bit(packed_fixture):
    granularity, source, out = packed_fixture
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == GRANULARITIES[granularity] and config["granularity"] == granularity
    stored = index_folder(out, ("model.safetensors",), "pack")
    ck = Checkpoint.open(source)
    linears = 0
    for name, tensor in ck.stream():
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" in stored:
            linears += 1
            back = ternary.dequantize(stored[f"{module}.weight_packed"].read(), stored[f"{module}.weight_scale"].read())
            assert back.dtype == tensor.dtype and torch.equal(back, tensor), name
        else:
            assert torch.equal(stored[name].read(), tensor), name
    assert linears == 7 * ck.spec.num_layers


def test_pack_size_and_inspect(packed_fixture):
    _, source, out = packed_fixture
    plugin = FORMATS["ternary"]
    info = plugin.inspect(out)
    assert info["lossless"] and info["variant"] == "2bit"
    ck = Checkpoint.open(source)
    linear = sum(t.shape[0] * t.shape[1] for n, t in ck.tensors.items() if n.endswith("proj.weight"))
    stored = index_folder(out, ("model.safetensors",), "pack")
    packed = sum(t.entry.end - t.entry.begin for n, t in stored.items() if n.endswith(".weight_packed"))
    assert packed * 4 == linear  # 2 bits per weight, scales beside


def test_loads_as_the_source_model(packed_fixture):
    from cpmkit.models.reference import load_reference

    _, source, out = packed_fixture
    ck = Checkpoint.open(source)
    model = FORMATS["ternary"].open(out, ck.spec, LoadOptions()).load()
    ids = torch.randint(0, ck.spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids), load_reference(ck)(ids), atol=1e-4, rtol=1e-4)


def test_inexact_magnitudes_are_refused():
    w = torch.tensor([[0.5, -0.5, 0.0, 0.5]], dtype=torch.bfloat16)
    assert exact_ternary(w, None) is not None
    w[0, 3] = 0.50390625  # one bf16 step above: ternary within rounding, not exactly
    assert exact_ternary(w, None) is None
    grouped = torch.tensor([[0.5, -0.5, 0.25, 0.0]], dtype=torch.bfloat16)
    assert exact_ternary(grouped, None) is None and exact_ternary(grouped, 2) is not None


def test_non_ternary_checkpoint_is_refused_naming_the_tensor(tmp_path):
    source = build_checkpoint(tmp_path / "MiniCPM4-0.5B", "minicpm4-0.5b")
    result = CliRunner().invoke(cli, ["convert", str(source), str(tmp_path / "out"), "--to", "ternary"])
    assert result.exit_code == 1
    assert "model.layers.0.self_attn.q_proj.weight is not ternary" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_absmean_follows_bitnets_rule_and_warns(tmp_path):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q = absmean_ternary(w, 64)
    groups = w.float().reshape(64, 2, 64)
    s = groups.abs().mean(-1).to(torch.bfloat16)
    assert torch.equal(q.scales, s)
    expected = (groups / s.float()[..., None]).round().clamp(-1, 1).reshape(64, 128)
    assert torch.equal(q.codes.float() - 1, expected)
    source = build_checkpoint(tmp_path / "MiniCPM4-0.5B", "minicpm4-0.5b")
    target = parse_target("ternary:absmean-g64")
    with pytest.warns(UserWarning, match="loses most of its quality"):
        out = FORMATS["ternary"].convert(Checkpoint.open(source), target, tmp_path / "pack", ConvertContext())
    assert FORMATS["ternary"].describe(out).variant == "2bit-absmean-g64"
    assert not FORMATS["ternary"].inspect(out)["lossless"]


@pytest.mark.parametrize("variant, message", [("absmean-g48", "absmean groups are"), ("3bit", "expected 2bit")])
def test_bad_variants(variant, message):
    with pytest.raises(CpmkitError, match=message):
        parse_target(f"ternary:{variant}")


def test_hostile_pack_is_one_line(packed_fixture, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, source, out = packed_fixture
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight_packed"
    tensors[name] = tensors[name] | 0b11  # code 3 in every byte's first field
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CpmkitError, match=f"{name} holds code 3"):
        FORMATS["ternary"].open(bad, None, LoadOptions()).load()
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CpmkitError, match="weight_packed has shape"):
        FORMATS["ternary"].open(bad, None, LoadOptions()).load()


@pytest.mark.parametrize("group", [-1, 64, 128])
def test_kernel_matches_the_format_dequantization(group):
    n, k = 40, 512
    gen = torch.Generator().manual_seed(group)
    codes = torch.randint(0, 3, (n, k), dtype=torch.uint8, generator=gen)
    scale = (0.02 + 0.06 * torch.rand(n, 1 if group == -1 else k // group, generator=gen)).to(torch.bfloat16)
    buffers = {"weight_packed": ternary.pack_codes(codes), "weight_scale": scale}
    fmt = TernaryPackWeight((n, k), group)
    torch_path = QuantLinear(fmt, buffers, backend=Backend.TORCH)
    expected_w = (codes.float() - 1) * scale.float().repeat_interleave(k // scale.shape[1], dim=1)
    assert torch.equal(torch_path.dequantize(), expected_w)
    x = torch.randn(3, k, generator=gen)
    got = QuantLinear(fmt, buffers, backend=Backend.TRITON)(x)
    assert torch.allclose(got, x @ expected_w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity, variant", [("row", "mlx:4bit-g64"), ("group64", "mlx:2bit-g64"),
                                                  ("group128", "mlx:3bit-g32")])
def test_mlx_holds_ternary_weights_exactly_read_by_mlx(granularity, variant, tmp_path):
    import mlx.core as mx
    import numpy as np

    source = build_checkpoint(tmp_path / "BitCPM4-0.5B", "bitcpm4", ternary=granularity)
    ck = Checkpoint.open(source)
    target = parse_target(variant)
    out = FORMATS["mlx"].convert(ck, target, tmp_path / "mlx", ConvertContext())
    lossy = FORMATS["mlx"].convert(ck, parse_target(variant, {"no_exact_ternary": True}), tmp_path / "lossy",
                                   ConvertContext())
    assert "ternary linears are held exactly" in (out / "README.md").read_text()
    bits, group = target.option("bits"), target.option("group_size")

    def mlx_weight(folder, module):
        stored = mx.load(str(folder / "model.safetensors"))
        w = mx.dequantize(stored[f"{module}.weight"], stored[f"{module}.scales"], stored[f"{module}.biases"],
                          group_size=group, bits=bits)
        return torch.from_numpy(np.array(w.astype(mx.float32)))

    for name, tensor in ck.stream(["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]):
        module = name.removesuffix(".weight")
        assert torch.equal(mlx_weight(out, module), tensor.float()), name
        assert not torch.equal(mlx_weight(lossy, module), tensor.float())


@pytest.mark.parametrize("variant, options, exact", [
    ("gptq:2bit-g64", {"rtn": True}, True),
    ("gptq:4bit-g64", {"nsamples": 2, "seqlen": 32}, True),
    ("gptq:2bit-g32", {"rtn": True, "asym": True, "layout": "compressed-tensors"}, True),
    ("gptq:2bit-g128", {"rtn": True}, False),  # two ternary scales in every group: quantized as usual
    ("gptq:4bit-g64", {"rtn": True, "no_exact_ternary": True}, False),
])
def test_gptq_holds_ternary_weights_exactly(variant, options, exact, tmp_path):
    source = build_checkpoint(tmp_path / "BitCPM4-0.5B", "bitcpm4", ternary="group64")
    ck = Checkpoint.open(source)
    out = FORMATS["gptq"].convert(ck, parse_target(variant, options), tmp_path / "gptq", ConvertContext())
    info = FORMATS["gptq"].inspect(out)
    assert info["quantized_linears"] == 7 * ck.spec.num_layers
    assert info["ternary_exact_linears"] == (info["quantized_linears"] if exact else 0)
    model = FORMATS["gptq"].open(out, ck.spec, LoadOptions()).load()
    for name, tensor in ck.stream(["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight"]):
        same = torch.equal(model.get_submodule(name.removesuffix(".weight")).dequantize(), tensor.float())
        assert same == exact, name


def test_bitnet_layout_is_what_transformers_packs_and_loads(tmp_path):
    """transformers' own BitNet packer gives our bytes, and its loader (BitNetDeserialize into an offline
    AutoBitLinear) gives back the source weights bit for bit as ``weight * weight_scale``."""
    import torch._dynamo
    from torch import nn
    from transformers.integrations import bitnet as hf_bitnet

    from cpmkit.models.reference import load_reference

    source = build_checkpoint(tmp_path / "BitCPM4-0.5B", "bitcpm4", ternary="tensor")
    ck = Checkpoint.open(source)
    out = FORMATS["ternary"].convert(ck, parse_target("ternary:bitnet"), tmp_path / "bitnet", ConvertContext())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitnet" and config["linear_class"] == "autobitlinear"
    stored = index_folder(out, ("model.safetensors",), "bitnet")
    linears = 0
    for name, tensor in ck.stream():
        if stored[name].dtype != torch.uint8:
            assert torch.equal(stored[name].read(), tensor), name
            continue
        linears += 1
        packed, scale = stored[name].read(), stored[name.removesuffix(".weight") + ".weight_scale"].read()
        trits = torch.sign(tensor)
        assert torch.equal(packed, hf_bitnet.pack_weights(trits.clone()))
        holder = nn.Module()
        holder.proj = hf_bitnet.AutoBitLinear(tensor.shape[1], tensor.shape[0], bias=False, dtype=tensor.dtype)
        with torch._dynamo.config.patch(disable=True):  # its unpacker is torch.compile'd; the eager code is the same
            loaded = hf_bitnet.BitNetDeserialize(None).convert({"weight": packed}, model=holder,
                                                               full_layer_name="proj.weight")["weight"]
        assert torch.equal(loaded * scale, tensor), name
    assert linears == 7 * ck.spec.num_layers
    model = FORMATS["ternary"].open(out, ck.spec, LoadOptions()).load()
    ids = torch.randint(0, ck.spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids), load_reference(ck)(ids), atol=1e-4, rtol=1e-4)
    info = FORMATS["ternary"].inspect(out)
    assert info["variant"] == "bitnet" and info["lossless"] and info["granularity"] == "tensor"


def test_bitnet_layout_refuses_finer_scales(tmp_path):
    source = build_checkpoint(tmp_path / "BitCPM4-0.5B", "bitcpm4", ternary="row")
    result = CliRunner().invoke(cli, ["convert", str(source), str(tmp_path / "out"), "--to", "ternary:bitnet"])
    assert result.exit_code == 1 and "holds one scale per tensor" in result.stderr and "per row" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    spec = Checkpoint.open(source).spec
    reasons = FORMATS["ternary"].capabilities(spec, TernaryGranularity.ROW)
    assert reasons["ternary"] is None and "one scale per tensor" in reasons["ternary-bitnet"]
    assert FORMATS["ternary"].capabilities(spec, TernaryGranularity.TENSOR)["ternary-bitnet"] is None


def test_bitnet_weight_kernel_matches_its_dequantization():
    n, k = 40, 512
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 3, (n, k), dtype=torch.uint8, generator=gen)
    buffers = {"weight": bitnet.pack_rows(codes), "weight_scale": torch.tensor([0.0371], dtype=torch.bfloat16)}
    fmt = BitNetWeight((n, k))
    expected = (codes.float() - 1) * buffers["weight_scale"].float()
    assert torch.equal(QuantLinear(fmt, buffers, backend=Backend.TORCH).dequantize(), expected)
    assert torch.equal(bitnet.unpack_rows(buffers["weight"], n), codes)
    x = torch.randn(3, k, generator=gen)
    got = QuantLinear(fmt, buffers, backend=Backend.TRITON)(x)
    assert QuantLinear(fmt, buffers, backend=Backend.TRITON).packed().layout.channel
    assert torch.allclose(got, x @ expected.T, rtol=1e-4, atol=1e-4)


def test_bitnet_rows_read_alone_match_the_whole():
    codes = torch.randint(0, 3, (10, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    packed = bitnet.pack_rows(codes)
    assert packed.shape == (3, 8) and torch.equal(bitnet.unpack_rows(packed, 10), codes)
    for start, stop in ((0, 10), (2, 7), (9, 10)):
        assert torch.equal(bitnet.unpack_row_range(packed, 10, start, stop), codes[start:stop])
