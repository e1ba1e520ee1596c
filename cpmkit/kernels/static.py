"""Compile the dequant-GEMM kernels for a GPU that is not here (Triton compiles for any target; ``ptxas`` and
``nvdisasm`` ship with it) and read their machine code: what a kernel will do per weight, without timing it.

:func:`compile_for` builds one kernel for one :class:`~cpmkit.kernels.layout.AffineLayout` and tile shape;
:func:`inner_loop` finds the K loop in its SASS (the largest backward branch) and counts what it executes per
iteration. Must run without ``TRITON_INTERPRET`` (the interpreter compiles nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpmkit.kernels.layout import AffineLayout

SM_90 = 90
# Triton's SASS listing: "LBB3:" labels, and instructions as "<control>\t[@P0 ]OPCODE operands;"
_LABEL = re.compile(r"^(\w+):$")
_INSTRUCTION = re.compile(r"^[^\t]*\t(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH = re.compile(r"\bBRA\s+(\w+);")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class LoopStats:
    instructions: int  # SASS instructions in one iteration of the K loop, per thread
    barriers: int  # BAR.SYNC / BAR.RED in it
    async_loads: int  # LDGSTS (cp.async) and UTMALDG (TMA) in it
    global_loads: int  # LDG in it
    shared_accesses: int  # LDS / STS in it
    ffma: int  # FFMA / HFMA2 in it


def compile_for(kernel, signature: dict[str, str | None], constants: dict, *, num_warps: int = 4,
                num_stages: int = 2, capability: int = SM_90):
    """``kernel`` compiled for ``sm_<capability>``; ``signature`` maps argument names to Triton types, None for
    an absent (None) pointer; ``constants`` gives every constexpr. Pointers and integers are marked divisible
    by 16, as a launch specializes them when they are (real shapes and torch's allocations are)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {name: None for name, t in signature.items() if t is None}
    consts.update(constants)
    full = {name: signature.get(name) or "constexpr" for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if full[name].startswith("*") or full[name] == "i32"}
    return triton.compile(ASTSource(kernel, full, consts, attrs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def registers_and_spills(compiled, capability: int = SM_90) -> tuple[int, int]:
    """(registers per thread, spilled bytes) from ``ptxas -v`` on the kernel's PTX (a loaded kernel knows these,
    but loading needs the GPU)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        done = subprocess.run([get_ptxas(capability).path, f"-arch=sm_{capability}a", "-v", str(ptx), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    usage, spills = _PTXAS_USAGE.search(done.stderr), _PTXAS_SPILLS.search(done.stderr)
    return int(usage.group(1)), int(spills.group(1)) + int(spills.group(2))


def layout_constants(lay: AffineLayout) -> dict:
    return dict(LO_BITS=lay.lo_bits, HI_BITS=lay.hi_bits, ZERO=lay.zero, BLOCK=lay.block, SUB_BLOCK=lay.sub_block,
                HAS_M=lay.has_m, CHANNEL=lay.channel)


def _loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(opcodes of every instruction, spans [start, end) of every loop: a backward branch to an earlier label)."""
    labels: dict[str, int] = {}
    instructions: list[tuple[str, str]] = []  # (opcode, text)
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = _INSTRUCTION.match(line)
        if ins:
            instructions.append((ins.group(2), line))
    spans = []
    for pos, (op, text) in enumerate(instructions):
        branch = _BRANCH.search(text) if op.startswith("BRA") else None
        if branch and branch.group(1) in labels and labels[branch.group(1)] <= pos:
            spans.append((labels[branch.group(1)], pos + 1))
    if not spans:
        raise ValueError("no loop in this SASS")
    return [op for op, _ in instructions], spans


def _stats(body: list[str], times: int = 1) -> LoopStats:
    count = lambda *prefixes: times * sum(1 for op in body if op.startswith(prefixes))  # noqa: E731
    return LoopStats(instructions=times * len(body), barriers=count("BAR.SYNC", "BAR.RED", "BAR "),
                     async_loads=count("LDGSTS", "UTMALDG"), global_loads=count("LDG"),
                     shared_accesses=count("LDS", "STS"), ffma=count("FFMA", "HFMA2", "FMUL", "FADD"))


def inner_loop(sass: str, inner_trips: int = 1) -> LoopStats:
    """Counts over one iteration of the largest loop in ``sass``. With ``inner_trips`` > 1 that loop holds
    another that runs ``inner_trips`` times an iteration (the largest loop inside it), counted that often."""
    ops, spans = _loops(sass)
    outer = max(spans, key=lambda s: s[1] - s[0])
    stats = _stats(ops[outer[0]:outer[1]])
    if inner_trips == 1:
        return stats
    inside = [s for s in spans if s != outer and outer[0] <= s[0] and s[1] <= outer[1]]
    if not inside:
        raise ValueError("no loop inside the largest loop of this SASS")
    inner = max(inside, key=lambda s: s[1] - s[0])
    extra = _stats(ops[inner[0]:inner[1]], inner_trips - 1)
    return LoopStats(*(a + b for a, b in zip(vars(stats).values(), vars(extra).values())))
