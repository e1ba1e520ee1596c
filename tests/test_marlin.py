"""CPM.cu Marlin: the tile layout against CPM.cu's ``gptq2marlin.py`` algorithm as its source states it (built
here from the permutation's own loops, independently of cpmkit's closed form), fusion of q/k/v and gate/up,
un-permuting at load back to the GPTQ source, the same logits as that GPTQ folder, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.gptq.convert import convert_to_gptq
from cpmkit.convert.marlin.capability import marlin_reason
from cpmkit.convert.marlin.convert import repack_gptq
from cpmkit.convert.marlin.load import open_marlin
from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
from cpmkit.convert.registry import FORMATS
from cpmkit.errors import CpmkitError
from cpmkit.formats.marlin import (
    WEIGHTS_FILE,
    pack_marlin,
    permute_scales,
    unpack_marlin,
)
from cpmkit.quant.gptq import GPTQSpec
from cpmkit.quant.groups import GroupSpec
from cpmkit.spec import read_spec
from cpmkit.testing import build_checkpoint


def gptq2marlin_perm() -> np.ndarray:
    """The 1024-entry permutation of one chunk of four 16x16 tiles, built the way gptq2marlin's get_perms
    loops build it, then the [0, 2, 4, 6, 1, 3, 5, 7] interleave inside every 8 entries."""
    perm = []
    for i in range(32):
        first = []
        col = i // 4
        for block in (0, 1):
            for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1):
                first.append(16 * row + col + 8 * block)
        for j in range(4):
            perm.extend(p + 256 * j for p in first)
    return np.array(perm).reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].ravel()


def gptq2marlin_qweight(codes: np.ndarray) -> np.ndarray:
    """codes [K, N] -> tiles of 16x16, the permutation per 1024, eight 4-bit values per word, low first."""
    k, n = codes.shape
    tiled = codes.reshape(k // 16, 16, n // 16, 16).transpose(0, 2, 1, 3).reshape(k // 16, 16 * n)
    tiled = tiled.reshape(-1, 1024)[:, gptq2marlin_perm()].reshape(k // 16, 16 * n).astype(np.uint32)
    out = np.zeros((k // 16, 2 * n), np.uint32)
    for i in range(8):
        out |= tiled[:, i::8] << (4 * i)
    return out.view(np.int32)


def gptq2marlin_scales(scales: np.ndarray) -> np.ndarray:
    order = np.array([i + 8 * j for i in range(8) for j in range(8)])
    return scales.reshape(-1, 64)[:, order].reshape(scales.shape)


def gptq_unpack(qweight: np.ndarray) -> np.ndarray:
    """GPTQ qweight [K/8, N] -> codes [K, N] (8 per word along K, low bits first)."""
    words = qweight.view(np.uint32)
    return np.stack([(words >> (4 * i)) & 15 for i in range(8)], axis=1).reshape(-1, words.shape[1])


@pytest.mark.parametrize("k, n", [(128, 64), (256, 192), (512, 4608)])
def test_tiles_equal_gptq2marlin(k, n):
    codes = np.random.default_rng(k + n).integers(0, 16, (k, n)).astype(np.uint8)
    packed = pack_marlin(torch.from_numpy(codes))
    assert np.array_equal(packed.numpy(), gptq2marlin_qweight(codes.astype(np.int64)))
    assert torch.equal(unpack_marlin(packed, k), torch.from_numpy(codes))
    scales = np.random.default_rng(1).standard_normal((k // 128, n)).astype(np.float16)
    permuted = permute_scales(torch.from_numpy(scales))
    assert np.array_equal(permuted.numpy(), gptq2marlin_scales(scales))
    assert torch.equal(permute_scales(permuted), torch.from_numpy(scales))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("marlin")
    ck = Checkpoint.open(build_checkpoint(root / "ck", "minicpm4"))
    target = parse_target("gptq:4bit-g128", {"nsamples": 4, "seqlen": 32})
    gptq = FORMATS["gptq"].convert(ck, target, root / "gptq", ConvertContext())
    marlin = FORMATS["marlin"].convert(ck, parse_target("marlin", {"from_gptq": str(gptq)}), root / "marlin",
                                       ConvertContext())
    return ck, gptq, marlin


def test_fused_tensors_equal_gptq2marlin_of_the_same_gptq(made):
    _, gptq, marlin = made
    with safe_open(gptq / "model.safetensors", "np") as src, safe_open(marlin / WEIGHTS_FILE, "np") as out:
        names = set(out.keys())
        assert not any(n.endswith(("qzeros", "g_idx")) for n in names)
        for fused, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("self_attn.o_proj", ("o_proj",))):
            prefix = f"model.layers.1.{fused.split('.')[0]}."
            packed = np.concatenate([src.get_tensor(f"{prefix}{p}.qweight") for p in parts], axis=-1)
            expected = gptq2marlin_qweight(gptq_unpack(packed).astype(np.int64))
            assert np.array_equal(out.get_tensor(f"model.layers.1.{fused}.qweight"), expected), fused
            scales = np.concatenate([src.get_tensor(f"{prefix}{p}.scales") for p in parts], axis=-1)
            assert np.array_equal(out.get_tensor(f"model.layers.1.{fused}.scales"), gptq2marlin_scales(scales))
    with safe_open(gptq / "model.safetensors", "pt") as src, safe_open(marlin / WEIGHTS_FILE, "pt") as out:
        for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
            assert torch.equal(out.get_tensor(name), src.get_tensor(name))
    assert (marlin / "config.json").read_bytes() == (gptq / "config.json").read_bytes()


def test_unpermuted_at_load_equals_the_gptq_source_and_runs_the_same(made):
    ck, gptq, marlin = made
    source = open_marlin(marlin)
    names = [f"model.layers.0.{m}.{b}" for m in ("self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
             for b in ("qweight", "scales", "g_idx")]
    with safe_open(gptq / "model.safetensors", "pt") as src:
        for name, tensor in source.read(names):
            assert torch.equal(tensor, src.get_tensor(name)), name
    ids = torch.randint(0, ck.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = source.load()(ids)
        theirs = FORMATS["gptq"].open(gptq, ck.spec, LoadOptions()).load()(ids)
    assert torch.equal(ours, theirs)


def _gptq_variant(made, tmp_path, **spec):
    ck, _, _ = made
    group = spec.pop("group", GroupSpec(4, 128, True))
    return convert_to_gptq(ck, tmp_path / "g", spec=GPTQSpec(group, **spec), layout="gptq", calibration=None)


def test_ineligible_gptq_is_refused_naming_the_key(made, tmp_path):
    ck, gptq, _ = made
    cases = [(_gptq_variant(made, tmp_path / "a", group=GroupSpec(4, 128, False)), "sym is False"),
             (_gptq_variant(made, tmp_path / "b", group=GroupSpec(8, 128, True)), "bits is 8"),
             (_gptq_variant(made, tmp_path / "c", group=GroupSpec(4, 64, True)), "group_size is 64")]
    act_order = shutil.copytree(gptq, tmp_path / "act")
    from safetensors.torch import load_file, save_file
    tensors = load_file(act_order / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.g_idx"] = tensors["model.layers.0.self_attn.q_proj.g_idx"].flip(0)
    save_file(tensors, act_order / "model.safetensors", metadata={"format": "pt"})
    cases.append((act_order, "q_proj.g_idx is not k // 128"))
    for folder, message in cases:
        with pytest.raises(CpmkitError, match=message):
            repack_gptq(folder, tmp_path / "out", ck)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant, reason", [("minicpm3", "MiniCPM3ForCausalLM is not"), ("minicpm-moe", "no MoE"),
                                             ("minicpm-s", "not fatrelu"), ("minicpm5", "LlamaForCausalLM is not"),
                                             ("minicpm-2b-128k", "not dynamic"), ("minicpm4", None)])
def test_what_cpmcu_runs(variant, reason, tmp_path):
    spec = read_spec(json.loads((build_checkpoint(tmp_path / "m", variant) / "config.json").read_text()))
    got = marlin_reason(spec)
    assert (got is None) if reason is None else (reason in got)
