import json
import pickle
import struct

import pytest
import torch
from click.testing import CliRunner

from cpmkit.checkpoint import Checkpoint
from cpmkit.cli import cli
from cpmkit.errors import CpmkitError
from cpmkit.spec import Family, RopeKind, read_spec
from cpmkit.testing import VARIANTS, Layout, build_checkpoint


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    return {v: build_checkpoint(root / v, v) for v in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layout_streams_the_same_tensors(tmp_path, variant):
    streams = {}
    for layout in Layout:
        ck = Checkpoint.open(build_checkpoint(tmp_path / layout.value, variant, layout=layout))
        streams[layout] = dict(ck.stream())
        assert list(streams[layout]) == list(ck.spec.tensor_shapes())
    base = streams[Layout.SAFETENSORS]
    for layout, tensors in streams.items():
        for name, tensor in tensors.items():
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, base[name]), (layout, name)


def test_minicpm_2b_config_defaults(fixtures):
    spec = Checkpoint.open(fixtures["minicpm-2b"]).spec
    config = json.loads((fixtures["minicpm-2b"] / "config.json").read_text())
    assert not {"model_type", "rope_theta", "tie_word_embeddings"} & config.keys()
    assert spec.family is Family.MINICPM
    assert spec.rope.theta == 10000.0 and spec.rope.kind is RopeKind.DEFAULT
    assert spec.tie_word_embeddings
    assert "lm_head.weight" not in spec.tensor_shapes()


def test_family_specifics(fixtures):
    spec = {v: Checkpoint.open(p).spec for v, p in fixtures.items()}
    assert spec["minicpm-2b-128k"].rope.kind is RopeKind.DYNAMIC and spec["minicpm-2b-128k"].rope.factor == 4.0
    assert not spec["minicpm-2b-128k"].tie_word_embeddings
    assert spec["minicpm-s"].activation.value == "fatrelu" and spec["minicpm-s"].activation_threshold == 0.03
    assert spec["minicpm-moe"].moe.num_experts == 8 and spec["minicpm-moe"].moe.top_k == 2
    assert spec["minicpm4"].rope.kind is RopeKind.LONGROPE and len(spec["minicpm4"].rope.long_factor) == 32
    assert spec["minicpm4"].eos_token_ids == (2, 997)
    assert spec["minicpm4-0.5b"].tie_word_embeddings  # key omitted: the remote default ties
    assert spec["minicpm3"].family is Family.MINICPM3 and spec["minicpm3"].rope.dim == 32
    assert spec["minicpm3"].mla.v_head_dim == 64 and spec["minicpm3"].head_dim == 96
    m5 = spec["minicpm5"]
    assert m5.family is Family.LLAMA and m5.head_dim == 128 != m5.hidden_size // m5.num_heads
    assert m5.rope.theta == 5e6 and m5.mup is None and not m5.tie_word_embeddings


def test_sparse_config_is_noted_and_ignored():
    config = json.loads(json.dumps(VARIANTS["minicpm4"][0]()))
    config["sparse_config"] = {"kernel_size": 32, "block_size": 64, "topk": 64, "dense_len": 8192}
    assert any("sparse_config" in note for note in read_spec(config).notes)


def test_redundant_tied_lm_head_is_dropped(tmp_path):
    path = build_checkpoint(tmp_path / "m", "minicpm-1b", layout="bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
    torch.save(state, path / "pytorch_model.bin")
    ck = Checkpoint.open(path)
    assert sorted(ck.dropped) == ["lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "lm_head.weight" not in dict(ck.stream())


# --- bad input: each is one clear line naming the file and the problem ---------------------------------

def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _truncate(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[:keep])


def _bad_missing_config(p):
    (p / "config.json").unlink()
    return "config.json: not found"


def _bad_missing_key(p):
    _edit_config(p, hidden_size=None)
    return "missing required key 'hidden_size'"


def _bad_unknown_arch(p):
    _edit_config(p, architectures=["QwenForCausalLM"])
    return "not supported: QwenForCausalLM"


def _bad_sala(p):
    _edit_config(p, architectures=["MiniCPMSALAForCausalLM"])
    return "not supported: MiniCPMSALAForCausalLM"


def _bad_truncated_mid_tensor(p):
    file = p / "model.safetensors"
    _truncate(file, file.stat().st_size - 1000)
    return "model.safetensors: tensor"


def _bad_header_length(p):
    file = p / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    file.write_bytes(bytes(data))
    return "header length"


def _bad_offsets(p):
    file = p / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + len(data), end + len(data)]
    blob = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    return "truncated"


def _bad_shape(p):
    _edit_config(p, intermediate_size=704)
    return "implies [704, 256]"


def _bad_missing_shard(p):
    (p / "model-00002-of-00003.safetensors").unlink()
    return "names shard model-00002-of-00003.safetensors, which is missing"


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad_pickle_code(p):
    with open(p / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)
    return "refused to unpickle"


def _bad_pickle_non_tensor(p):
    state = torch.load(p / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = [1.0, 2.0]
    torch.save(state, p / "pytorch_model.bin")
    return "not a tensor"


def _config_value(**changes):
    def corrupt(p):
        _edit_config(p, **changes)
        key, value = next(iter(changes.items()))
        return {"hidden_size": "hidden_size must be an integer, got 256.5",
                "num_attention_heads": "num_attention_heads must be at least 1, got 0",
                "rope_scaling": "rope_scaling must be an object or null, got 'linear'",
                "rope_theta": "rope_theta must be positive, got 0",
                "rms_norm_eps": "rms_norm_eps must be positive, got -1",
                "num_hidden_layers": "num_hidden_layers must be an integer, got '2'",
                "scale_emb": "scale_emb must be a finite number, got None" if value is None else
                "scale_emb must be positive"}[key]
    return corrupt


BAD_INPUTS = {
    "fractional size": ("safetensors", _config_value(hidden_size=256.5)),
    "no heads": ("safetensors", _config_value(num_attention_heads=0)),
    "string rope_scaling": ("safetensors", _config_value(rope_scaling="linear")),
    "zero rope_theta": ("safetensors", _config_value(rope_theta=0)),
    "negative eps": ("safetensors", _config_value(rms_norm_eps=-1)),
    "string layers": ("safetensors", _config_value(num_hidden_layers="2")),
    "negative muP scale": ("safetensors", _config_value(scale_emb=-12)),
    "missing config": ("safetensors", _bad_missing_config),
    "missing key": ("safetensors", _bad_missing_key),
    "unknown architecture": ("safetensors", _bad_unknown_arch),
    "sala": ("safetensors", _bad_sala),
    "truncated mid-tensor": ("safetensors", _bad_truncated_mid_tensor),
    "header length past end": ("safetensors", _bad_header_length),
    "offsets past end": ("safetensors", _bad_offsets),
    "shape contradicts config": ("safetensors", _bad_shape),
    "missing shard": ("sharded", _bad_missing_shard),
    "pickle with code": ("bin", _bad_pickle_code),
    "pickle with non-tensor": ("bin", _bad_pickle_non_tensor),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(tmp_path, case, capsys):
    layout, corrupt = BAD_INPUTS[case]
    path = build_checkpoint(tmp_path / "m", "minicpm-1b", layout=layout)
    expected = corrupt(path)
    with pytest.raises(CpmkitError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        Checkpoint.open(path)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], result.stderr
    assert "this must never run" not in capsys.readouterr().out


def test_missing_path_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such file or directory"


def test_nonfinite_weight_refused_unless_allowed(tmp_path):
    path = build_checkpoint(tmp_path / "m", "minicpm-1b", layout="bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CpmkitError, match="model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf"):
        dict(Checkpoint.open(path).stream())
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1 and "--allow-nonfinite" in result.stderr
    assert CliRunner().invoke(cli, ["inspect", str(path), "--allow-nonfinite", "--json"]).exit_code == 0


def test_hub_id_without_network_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["inspect", "openbmb/MiniCPM-2B-sft-bf16", "--no-scan"])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("Error: openbmb/MiniCPM-2B-sft-bf16: not a local path")
