"""A conversion killed half-way (SIGKILL or SIGTERM) leaves no worker process behind; SIGTERM also removes its
partial output, and the next run removes the partial a SIGKILL left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpmkit.testing import build_checkpoint

# big enough that the K-quant quantizer workers run for a few seconds on 2 cores
SIZE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 8,
        "num_hidden_layers": 4}
WAIT_S = 120


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("big") / "m", "minicpm-1b", config_overrides=SIZE)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(checkpoint: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """A CLI conversion, once its quantizer workers are running and its partial output exists."""
    proc = subprocess.Popen([sys.executable, "-c", "from cpmkit.cli import main; main()", "--threads", "2",
                             "convert", str(checkpoint), str(out), "--to", "gguf:Q4_K_M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        workers = _children(proc.pid)
        if workers and list(out.parent.glob(f".{out.name}.*.partial")):
            return proc, workers
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the conversion never started its workers")


def _running_for(out: Path) -> list[int]:
    """Every live process whose command line names ``out``: the conversion and any worker it forked, including
    one forked after the test last looked."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(out) in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes and /proc are Linux's")
def test_sigkill_leaves_no_workers_and_the_next_run_clears_the_partial(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    proc, workers = _start(checkpoint, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(workers), f"orphaned quantizer workers {workers} still run after the parent was killed"
    assert _gone(_running_for(out)), f"processes {_running_for(out)} of the killed conversion still run"
    assert list(tmp_path.glob(".m.gguf.*.partial")), "a SIGKILL cannot clean up; the next run does"
    done = subprocess.run([sys.executable, "-c", "from cpmkit.cli import main; main()", "convert", str(checkpoint),
                           str(out), "--to", "gguf:Q8_0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes and /proc are Linux's")
def test_sigterm_cleans_up_like_ctrl_c(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    proc, workers = _start(checkpoint, out)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode != 0 and b"Traceback" not in stderr, stderr
    assert _gone(workers) and _gone(_running_for(out))
    assert list(tmp_path.iterdir()) == []
