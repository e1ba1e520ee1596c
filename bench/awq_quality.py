"""AWQ quality and cost: cpmkit's AWQ against llm-compressor's AWQModifier + QuantizationModifier, round-to-nearest on
the same asymmetric grid, and cpmkit's GPTQ with zero points, on the demo model with no test-set leakage, every
artifact scored by the same ``cpmkit verify`` (``demo_quality.py`` has the setup). 4-bit rows in AutoAWQ's GEMM
layout, 3-bit ones in compressed-tensors (AutoAWQ's layouts are 4-bit only).

    python bench/awq_quality.py --llmcompressor-python /path/to/venv/bin/python [--work /tmp/cpmkit-bench-awq]

Without --llmcompressor-python only cpmkit's rows are measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo_quality import DemoBench

CPMKIT_TARGETS = [  # (row label, convert arguments, calibrated)
    ("RTN gptq:4bit-g128 --asym", ["--to", "gptq:4bit-g128", "--rtn", "--asym"], False),
    ("cpmkit awq:4bit-g128", ["--to", "awq:4bit-g128"], True),
    ("cpmkit awq:4bit-g128 --clip", ["--to", "awq:4bit-g128", "--clip"], True),
    ("cpmkit gptq:4bit-g128 --asym", ["--to", "gptq:4bit-g128", "--asym"], True),
    ("RTN gptq:3bit-g128 --asym", ["--to", "gptq:3bit-g128", "--rtn", "--asym"], False),
    ("cpmkit awq:3bit-g128 (compressed-tensors)", ["--to", "awq:3bit-g128", "--layout", "compressed-tensors"], True),
    ("cpmkit gptq:3bit-g128 --asym", ["--to", "gptq:3bit-g128", "--asym"], True),
]
LLMCOMPRESSOR_TARGETS = [("llm-compressor AWQ 4bit-g128 asym", 4), ("llm-compressor AWQ 3bit-g128 asym", 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-awq"))
    parser.add_argument("--llmcompressor-python", help="python of a venv with llm-compressor installed")
    args = parser.parse_args()
    bench = DemoBench(args.work)
    for label, convert_args, calibrated in CPMKIT_TARGETS:
        bench.cpmkit_row(label, convert_args, calibrated)
    if args.llmcompressor_python:
        for label, bits in LLMCOMPRESSOR_TARGETS:
            bench.llmcompressor_row(args.llmcompressor_python, "llmcompressor_awq.py", label, ["--bits", str(bits)])
    bench.print_table()


if __name__ == "__main__":
    main()
