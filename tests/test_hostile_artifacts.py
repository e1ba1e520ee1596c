"""Broken and hostile artifacts handed to ``inspect`` and ``verify``: each is one line naming the file and the
problem, exit status 1, and nothing written (no report folder)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from click.testing import CliRunner
from test_cli import assert_one_error_line

from cpmkit.checkpoint import Checkpoint
from cpmkit.cli import cli
from cpmkit.convert.plugin import ConvertContext, parse_target
from cpmkit.convert.registry import FORMATS
from cpmkit.testing import build_checkpoint


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ck_dir = build_checkpoint(root / "ck", "minicpm4-0.5b")
    ck = Checkpoint.open(ck_dir)
    gguf = FORMATS["gguf"].convert(ck, parse_target("gguf:Q8_0"), root / "m.gguf", ConvertContext())
    mlx = FORMATS["mlx"].convert(ck, parse_target("mlx:8bit-g64"), root / "mlx", ConvertContext())
    gptq = FORMATS["gptq"].convert(ck, parse_target("gptq:8bit-g32", {"nsamples": 4, "seqlen": 32}), root / "gptq",
                                   ConvertContext())
    awq = FORMATS["awq"].convert(ck, parse_target("awq:4bit-g64", {"nsamples": 4, "seqlen": 32}), root / "awq",
                                 ConvertContext())
    return ck_dir, {"gguf": gguf, "mlx": mlx, "gptq": gptq, "awq": awq}


def _gguf_truncated(gguf, out):
    out.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    return "not a readable GGUF file, truncated or corrupt"


def _gguf_header_only(gguf, out):
    out.write_bytes(gguf.read_bytes()[:40])
    return "not a readable GGUF file"


def _gguf_absurd_tensor_count(gguf, out):
    data = bytearray(gguf.read_bytes())
    data[8:16] = struct.pack("<Q", 2**60)  # after the magic and version: n_tensors
    out.write_bytes(bytes(data))
    return "not a readable GGUF file"


def _gguf_absurd_key_count(gguf, out):
    data = bytearray(gguf.read_bytes())
    data[16:24] = struct.pack("<Q", 2**60)  # n_kv
    out.write_bytes(bytes(data))
    return "not a readable GGUF file"


def _gguf_offset_past_end(gguf, out):
    """The last tensor's data moved far beyond the end of the file."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    last = reader.tensors[-1]
    data = bytearray(gguf.read_bytes())
    # the tensor info ends with its uint64 offset relative to the data section: find and replace it
    relative = last.data_offset - reader.data_offset
    at = data.rfind(struct.pack("<Q", relative), 0, reader.data_offset)
    assert at > 0
    data[at : at + 8] = struct.pack("<Q", relative + 10 * len(data))
    out.write_bytes(bytes(data))
    return "not a readable GGUF file"


def _mlx_bits_contradict(mlx, out):
    shutil.copytree(mlx, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["bits"] = 4
    config["quantization_config"]["bits"] = 4
    (out / "config.json").write_text(json.dumps(config))
    return "config.json says lm_head has bits 4 but its tensors hold bits 8"


def _mlx_group_contradicts(mlx, out):
    shutil.copytree(mlx, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["group_size"] = 32
    (out / "config.json").write_text(json.dumps(config))
    return "has group_size 32 but its tensors hold group_size 64"


def _mlx_no_bits(mlx, out):
    shutil.copytree(mlx, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization"] = {"group_size": 64}
    (out / "config.json").write_text(json.dumps(config))
    return "'quantization' gives no integer 'bits'"


def _mlx_extra_tensor(mlx, out):
    from safetensors.torch import load_file, save_file

    shutil.copytree(mlx, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.9.mlp.up_proj.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, weights, metadata={"format": "mlx"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return "tensor model.layers.9.mlp.up_proj.weight is not part of this"


def _rewrite_tensors(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: "model.safetensors" for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_quantization(gptq, out, **changes) -> None:
    shutil.copytree(gptq, out)
    for name in ("config.json", "quantize_config.json"):
        config = json.loads((out / name).read_text())
        (config.get("quantization_config") or config).update(changes)
        (out / name).write_text(json.dumps(config))


def _gptq_bits_contradict(gptq, out):
    _edit_quantization(gptq, out, bits=4)
    return "model.layers.0.self_attn.q_proj: qweight has shape [64, 256], but a 4-bit"


def _gptq_group_does_not_divide(gptq, out):
    _edit_quantization(gptq, out, group_size=48)
    return "group size 48"


def _gptq_scales_missing(gptq, out):
    shutil.copytree(gptq, out)
    _rewrite_tensors(out, lambda t: t.pop("model.layers.1.self_attn.o_proj.scales"))
    return "model.layers.1.self_attn.o_proj.scales is missing"


def _gptq_g_idx_out_of_range(gptq, out):
    shutil.copytree(gptq, out)

    def change(tensors):
        tensors["model.layers.0.self_attn.q_proj.g_idx"][3] = 1000
    _rewrite_tensors(out, change)
    return "model.layers.0.self_attn.q_proj.g_idx"


def _gptq_bad_json(gptq, out):
    shutil.copytree(gptq, out)
    (out / "config.json").write_text('{"quantization_config": {"bits": 8,')
    return "config.json"


def _edit_awq(awq, out, **changes) -> None:
    shutil.copytree(awq, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config))


def _awq_bits(awq, out):
    _edit_awq(awq, out, bits=8)
    return "AWQ bits 8; AutoAWQ's layouts are 4-bit"


def _awq_group_contradicts(awq, out):
    _edit_awq(awq, out, group_size=128)
    return "model.layers.0.mlp.down_proj.qzeros has shape [12, 32], but a gemm 256x768 weight in groups of 128 needs"


def _awq_version(awq, out):
    _edit_awq(awq, out, version="exllama")
    return "AWQ version 'exllama'"


GGUF_CASES = [_gguf_truncated, _gguf_header_only, _gguf_absurd_tensor_count, _gguf_absurd_key_count,
              _gguf_offset_past_end]
MLX_CASES = [_mlx_bits_contradict, _mlx_group_contradicts, _mlx_no_bits, _mlx_extra_tensor]
GPTQ_CASES = [_gptq_bits_contradict, _gptq_group_does_not_divide, _gptq_scales_missing, _gptq_g_idx_out_of_range,
              _gptq_bad_json]
AWQ_CASES = [_awq_bits, _awq_group_contradicts, _awq_version]
CASES = {**{f: "gguf" for f in GGUF_CASES}, **{f: "mlx" for f in MLX_CASES}, **{f: "gptq" for f in GPTQ_CASES},
         **{f: "awq" for f in AWQ_CASES}}


@pytest.mark.parametrize("corrupt", list(CASES), ids=lambda f: f.__name__.lstrip("_"))
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_hostile_artifact_is_one_line(made, tmp_path, corrupt, command):
    ck_dir, artifacts = made
    fmt = CASES[corrupt]
    out = tmp_path / ("bad.gguf" if fmt == "gguf" else f"bad-{fmt}")
    expected = corrupt(artifacts[fmt], out)
    args = ["inspect", str(out)] if command == "inspect" else \
        ["verify", str(out), "--reference", str(ck_dir), "--no-speed", "--ctx", "64", "--chunks", "1",
         "--report", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli, args)
    assert_one_error_line(result, expected)
    assert str(out) in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "report").exists()
