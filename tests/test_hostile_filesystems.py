"""Outputs on hostile file systems, through the CLI: a read-only destination and a folder where a file is asked
for. Each is one line naming the path and exit status 1, and leaves nothing behind. Root ignores permissions,
so the read-only file system is injected where the writers create their temporary output. (A disk filling
mid-write is tests/test_mlx_convert.py::test_output_is_atomic.)"""

from __future__ import annotations

import errno
import tempfile

import pytest
from click.testing import CliRunner

from cpmkit.cli import cli
from cpmkit.testing import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "m", "minicpm4-0.5b")


def _read_only(*args, dir=None, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(dir))


@pytest.mark.parametrize("target", ["gguf:Q8_0", "mlx:4bit-g64", "ternary:absmean"])
def test_read_only_destination_is_one_line(checkpoint, tmp_path, monkeypatch, target):
    monkeypatch.setattr(tempfile, "mkstemp", _read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", _read_only)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(checkpoint), str(out), "--to", target])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "Read-only file system" in lines[0] and str(tmp_path) in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_folder_where_a_file_is_asked_for(checkpoint, tmp_path):
    out = tmp_path / "out.gguf"
    out.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(checkpoint), str(out), "--to", "gguf:Q8_0", "--overwrite"])
    assert result.exit_code == 1 and f"{out}: is a folder" in result.stderr
    assert out.is_dir() and list(out.iterdir()) == []
