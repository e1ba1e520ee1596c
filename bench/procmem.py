"""Wall time and peak memory of a command and every process it starts, for the benchmarks.

Peak memory is the proportional set size (PSS) of the process tree, sampled every 0.1 s from
``/proc/PID/smaps_rollup``: pages shared between processes (forked workers' torch) are counted once, and
file pages count only while mapped, so what a process reads with ``read()`` does not inflate it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SAMPLE_S = 0.1


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (cpmkit's quantizer workers are grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(command: list[str], **popen) -> tuple[float, float]:
    """Run ``command``: (wall seconds, peak PSS of it and all its descendants together, in GiB). A failing
    command ends the benchmark."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, **popen)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(pss_kib(pid) for pid in process_tree(proc.pid)))
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({proc.returncode})")
    return seconds, peak / 2**20
