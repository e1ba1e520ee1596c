"""What reading a CPM.cu Marlin folder costs before the kernels can run it, per MiniCPM4-8B block (q/k/v fused
4608x4096, o 4096x4096, gate/up fused 32768x4096, down 4096x16384; random 4-bit codes): un-tiling the Marlin
tensors into codes, building GPTQ buffers from them, and the GPTQ kernel weight's repack into the kernels'
layout. Checks that the codes come back exactly.

    python bench/marlin_load.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from cpmkit.convert.gptq.weight import GPTQWeight
from cpmkit.formats import marlin
from cpmkit.formats.gptq.pack import pack_qzeros, pack_rows

BLOCK = {"qkv_proj": (4096, 4608), "o_proj": (4096, 4096), "gate_up_proj": (4096, 32768), "down_proj": (16384, 4096)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    totals = [0.0, 0.0, 0.0]
    print("| tensor | K x N | un-tile s | GPTQ buffers s | kernel repack s |")
    print("|---|---|---|---|---|")
    for name, (k, n) in BLOCK.items():
        codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, generator=gen)
        qweight = marlin.pack_marlin(codes).to(args.device)
        scales = (torch.rand(k // marlin.GROUP_SIZE, n, generator=gen) * 0.01).half().to(args.device)
        t0 = time.perf_counter()
        unpacked, permuted = marlin.unpack_marlin(qweight, k), marlin.permute_scales(scales)
        t1 = time.perf_counter()
        buffers = (pack_rows(unpacked.contiguous(), marlin.BITS),
                   pack_qzeros(torch.full((n, k // marlin.GROUP_SIZE), 8, dtype=torch.int16, device=args.device),
                               marlin.BITS, v1=False),
                   permuted, torch.arange(k, dtype=torch.int32, device=args.device) // marlin.GROUP_SIZE)
        t2 = time.perf_counter()
        GPTQWeight(marlin.BITS, marlin.GROUP_SIZE, (n, k), "gptq", v1=False).pack(*buffers, name)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        assert torch.equal(unpacked.cpu(), codes), name
        for i, t in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            totals[i] += t
        print(f"| {name} | {k} x {n} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} |")
    print(f"| block | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} |")
    print(f"\n{sum(totals):.1f} s per block, {32 * sum(totals):.0f} s for MiniCPM4-8B's 32 blocks on {args.device}")


if __name__ == "__main__":
    main()
