"""The command line end to end on fixtures: each command's output, --json purity, and that a failure
writes nothing."""

import json

import pytest
import torch
from click.testing import CliRunner

from cpmkit.cli import cli
from cpmkit.formats.gguf.file import read_gguf
from cpmkit.testing import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "m", "minicpm4")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_error_line(result, expected: str) -> None:
    """Exit status 1 and one ``Error:`` line naming the problem: the last line on stderr (progress lines, which
    a run not on a terminal prints, may come before it), and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith("Error: ") and expected in lines[-1], lines
    assert sum(line.startswith("Error: ") for line in lines) == 1 and "Traceback" not in result.stderr


def test_convert_gguf_then_inspect_it(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    result = run("convert", checkpoint, out, "--to", "gguf:Q4_K_M", "--tensor-type", "ffn_up=Q8_0")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    types = {t.name: t.qtype.name for t in read_gguf(out).tensors.values()}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_K"
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["architecture"] == "minicpm" and info["metadata"]["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert {t["name"]: t["type"] for t in info["tensors"]} == types


def test_convert_with_calibration_writes_the_imatrix_beside(checkpoint, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "m.gguf"
    result = run("convert", checkpoint, out, "--to", "gguf:Q4_K_M", "--calib", calib, "--seqlen", 64)
    assert result.exit_code == 0, result.output
    imatrix = read_gguf(tmp_path / "m.gguf.imatrix.gguf")
    assert any(name.endswith(".in_sum2") for name in imatrix.tensors)
    assert run("imatrix", checkpoint, tmp_path / "im.gguf", "--calib", calib, "--seqlen", 64).exit_code == 0
    assert (tmp_path / "im.gguf").is_file()


def test_convert_mlx(checkpoint, tmp_path):
    out = tmp_path / "mlx"
    result = run("convert", checkpoint, out, "--to", "mlx:8bit-g32")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}


def test_existing_output_refused_and_kept(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    result = run("convert", checkpoint, out, "--to", "gguf:Q8_0")
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert out.read_text() == "keep me"


def _truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    return "truncated"


def _nan_in_last_layer(path):
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    torch.save(state, path / "pytorch_model.bin")
    return "NaN/Inf"


@pytest.mark.parametrize("target", ["gguf", "mlx"])
@pytest.mark.parametrize("corrupt, layout", [(_truncate, "safetensors"), (_nan_in_last_layer, "bin")])
def test_failed_convert_leaves_nothing(tmp_path, target, corrupt, layout):
    """Found when the checkpoint is opened (truncated) or only mid-way through the stream (NaN in the last
    layer): either way one line, and no output or temporary file left behind."""
    path = build_checkpoint(tmp_path / "bad", "minicpm-1b", layout=layout)
    expected = corrupt(path)
    result = run("convert", path, tmp_path / "out", "--to", target)
    assert_one_error_line(result, expected)
    assert list(tmp_path.iterdir()) == [tmp_path / "bad"]


def test_eval_json_is_one_object(checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 30)
    result = run("eval", checkpoint, "--text", text, "--ctx", 64, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ctx"] == 64 and payload["n_tokens"] == payload["n_chunks"] * (64 - 32 - 1)
    assert payload["ppl"] > 1
