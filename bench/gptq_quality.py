"""GPTQ quality and cost: cpmkit's GPTQ against llm-compressor's GPTQModifier and against round-to-nearest, on
the demo model with no test-set leakage, every artifact scored by the same ``cpmkit verify``.

Both quantizers calibrate on the same 128 x 512 windows of the demo's training text; every artifact is scored on
the held-out rest (``demo_quality.py`` has the setup).
Round-to-nearest rows: GPTQ's own layout with ``--rtn`` (the same bits and groups; what llm-compressor's
QuantizationModifier does), GGUF Q4_0 (symmetric, 32 weights per scale) and MLX 4- and 3-bit g64 (affine).

    python bench/gptq_quality.py --llmcompressor-python /path/to/venv/bin/python [--work /tmp/cpmkit-bench-gptq]

Without --llmcompressor-python only cpmkit's rows are measured. Prints a markdown table: quantize wall time
and peak memory (PSS of the process tree), bits per weight, perplexity and its change, mean KLD, top-1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo_quality import DemoBench

CPMKIT_TARGETS = [  # (row label, convert arguments, calibrated)
    ("RTN gguf:Q4_0", ["--to", "gguf:Q4_0"], False),
    ("RTN mlx:4bit-g64", ["--to", "mlx:4bit-g64"], False),
    ("RTN mlx:3bit-g64", ["--to", "mlx:3bit-g64"], False),
    ("RTN gptq:4bit-g128", ["--to", "gptq:4bit-g128", "--rtn"], False),
    ("RTN gptq:3bit-g128", ["--to", "gptq:3bit-g128", "--rtn"], False),
    ("cpmkit gptq:4bit-g128 (order static)", ["--to", "gptq:4bit-g128"], True),
    ("cpmkit gptq:4bit-g128 --order none", ["--to", "gptq:4bit-g128", "--order", "none"], True),
    ("cpmkit gptq:4bit-g128 --order desc", ["--to", "gptq:4bit-g128", "--order", "desc"], True),
    ("cpmkit gptq:3bit-g128 (order static)", ["--to", "gptq:3bit-g128"], True),
    ("cpmkit gptq:3bit-g128 --order none", ["--to", "gptq:3bit-g128", "--order", "none"], True),
]
LLMCOMPRESSOR_TARGETS = [  # (row label, bits, actorder)
    ("llm-compressor 4bit-g128 (actorder static)", 4, "static"),
    ("llm-compressor 4bit-g128 actorder none", 4, "none"),
    ("llm-compressor 3bit-g128 (actorder static)", 3, "static"),
    ("llm-compressor 3bit-g128 actorder none", 3, "none"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpmkit-bench-gptq"))
    parser.add_argument("--llmcompressor-python", help="python of a venv with llm-compressor installed")
    args = parser.parse_args()
    bench = DemoBench(args.work)
    for label, convert_args, calibrated in CPMKIT_TARGETS:
        bench.cpmkit_row(label, convert_args, calibrated)
    if args.llmcompressor_python:
        for label, bits, actorder in LLMCOMPRESSOR_TARGETS:
            bench.llmcompressor_row(args.llmcompressor_python, "llmcompressor_gptq.py", label,
                                    ["--bits", str(bits), "--actorder", actorder])
    bench.print_table()


if __name__ == "__main__":
    main()
