"""Dequant-GEMM latency and bandwidth on MiniCPM linear shapes, against torch's BF16 matmul.

    python bench/kernels_gpu.py --tune-cache tune_h100.json [--formats Q4_K,mlx4g64] [--batches 1,16]

For each format, each linear shape of MiniCPM4-8B (q 4096x4096, k/v 256x4096, gate/up 16384x4096,
down 4096x16384) and MiniCPM5-1B (q 2048x1536, k/v 256x1536, o 1536x2048, gate/up 4608x1536, down
1536x4608), and the joined shapes the models run (q+k+v and gate+up side by side: ``kernels.linear.fused_forward``) and each batch M in 1, 16, 64, 256 it prints: the BF16 matmul time, the quantized kernel's
time, the speedup, the achieved GB/s (weight + activation + output bytes over time) and its fraction of
the measured device-to-device copy bandwidth (the practical HBM roofline), and the strategy and tiles.
Tiles are autotuned once per (layout, shape, M bucket, dtype) and cached in the ``--tune-cache`` JSON
(one file per GPU model);
``--no-tune`` uses the cache where it has an entry and the dispatcher's defaults elsewhere. Two timings
per call: "host", ``triton.testing.do_bench`` (clears the 50 MB L2 before every call; counts the Python and
launch time too, which on small layers is most of it), and "graph", device time only
(``cpmkit.kernels.timing.device_ms``: CUDA-graph replay with an L2 flush before every call), which the
autotuner also uses and from which speedup and bandwidth are computed. Weights are random but valid (any
code decodes), so timings equal those of real checkpoints. Without CUDA it prints one line and exits 0.

What an H100 SXM (HBM3, 3.35 TB/s spec, ~2.9-3.0 TB/s copy) should show:

* Batch 1 is bandwidth-bound, so the ceiling on the speedup is BF16 bytes over quantized bytes: 16/4.125
  = 3.9x for int4 with one fp16 scale per 128 (the figure usually quoted; Marlin reaches about 3.1x on
  large layers), 3.56x for Q4_0 and MLX 4-bit g64 (4.5 bits per weight), 3.46x for Q4_K (4.625 in our
  layout), 2.84x Q5_K, 2.44x Q6_K, 1.88x Q8_0, 7.8x TQ2_0. The split-K GEMV streams coalesced 128-bit
  rows and decodes with a shift, a mask and one FMA per weight; expect 60-80 % of the copy bandwidth on
  gate/up/down (16-67 M weights), i.e. roughly 2.2-2.8x over BF16 for the 4-bit formats, and less on
  q/o and far less on k/v (256 x 1536..4096 = 0.2-0.6 MB: a few microseconds, dominated by launch and
  tail effects; split-K partials are summed inside the kernel). Below about 50 % on the large
  layers means the decode is instruction-bound (check the GEMV tiles the tuner chose) and is the first
  thing to look at.
* Batch 16 and 64 run the tiled tensor-core GEMM: still bandwidth-bound for BF16 (64 FLOP per weight
  byte is far under the ~300 FLOP/byte ridge), so the 4-bit formats should keep 1.5-2.5x.
* Batch 256 is near the ridge for BF16 and cuBLAS is hard to beat there: expect 0.6-1.0x; prefill that
  large is not where weight-only quantization pays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SHAPES = {  # model -> [(layer, N, K)]
    "minicpm4-8b": [("q/o", 4096, 4096), ("k/v", 256, 4096), ("gate/up", 16384, 4096), ("down", 4096, 16384),
                    ("q+k+v fused", 4608, 4096), ("gate+up fused", 32768, 4096)],
    "minicpm5-1b": [("q", 2048, 1536), ("k/v", 256, 1536), ("o", 1536, 2048), ("gate/up", 4608, 1536),
                    ("down", 1536, 4608), ("q+k+v fused", 2560, 1536), ("gate+up fused", 9216, 1536)],
}
GGUF_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0")
MLX_FORMATS = {f"mlx{b}g{g}": (b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)}
DEFAULT_FORMATS = "Q4_K,Q4_0,Q5_K,Q6_K,Q8_0,TQ2_0,mlx4g64,mlx8g64"


def random_weight(fmt: str, n: int, k: int, device: str):
    """A random, valid packed weight of format ``fmt`` on ``device``."""
    from gguf import GGMLQuantizationType as QType

    from cpmkit.convert.gguf.weight import pack_gguf
    from cpmkit.convert.mlx.weight import pack_mlx
    from cpmkit.formats.gguf.layout import BLOCKS

    if fmt in MLX_FORMATS:
        bits, group = MLX_FORMATS[fmt]
        words = torch.randint(-(1 << 31), 1 << 31, (n, k * bits // 32), dtype=torch.int64, device=device)
        scales = torch.rand(n, k // group, device=device, dtype=torch.float16) * 1e-2
        biases = torch.randn(n, k // group, device=device, dtype=torch.float16) * 1e-2
        return pack_mlx(words.to(torch.int32), scales, biases, bits, group)
    qtype = QType[fmt]
    bl = BLOCKS[qtype]
    blocks = torch.randint(0, 256, (n * k // bl.block_size, bl.type_size), dtype=torch.uint8, device=device)
    fields = bl.split_fields(blocks)
    for name in ("d", "dmin", "m"):
        if name in fields:
            fields[name] = (torch.rand(fields[name].shape, device=device) * 1e-3).half()
    return pack_gguf(bl.join_fields(fields).reshape(n, -1), qtype, (n, k))


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), the practical HBM roofline."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune-cache", type=Path, required=True, help="autotune JSON, one per GPU model")
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help=f"comma list of {', '.join(GGUF_FORMATS)}, mlx<bits>g<group>")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--no-tune", action="store_true", help="never autotune; cache entries or defaults")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device; nothing to measure")
        return 0

    from cpmkit.kernels.dispatch import (
        TuneCache,
        autotune,
        plan,
        quant_matmul,
        tune_key,
    )
    from cpmkit.kernels.timing import device_ms

    device = "cuda"
    gpu = torch.cuda.get_device_name()
    tune = TuneCache.load(args.tune_cache, gpu)
    roofline = copy_bandwidth(device)
    print(f"# {gpu}; copy bandwidth {roofline:.0f} GB/s; torch {torch.__version__}")
    print("times in us; 'host' = do_bench per call (includes Python and launch), 'graph' = CUDA graph replay "
          "(device time only); speedup, GB/s and roof % from the graph times")
    print(f"{'model':12} {'layer':8} {'N x K':>12} {'format':8} {'M':>4} {'bf16':>7} {'quant':>7} {'bf16':>7} "
          f"{'quant':>7} {'speedup':>7} {'GB/s':>6} {'roof %':>6}  plan")
    print(f"{'':48} {'host':>7} {'host':>7} {'graph':>7} {'graph':>7}")
    formats = args.formats.split(",")
    for fmt in formats:
        if fmt not in GGUF_FORMATS and fmt not in MLX_FORMATS:
            parser.error(f"unknown format {fmt!r}")
    for model in args.models.split(","):
        for layer, n, k in SHAPES[model]:
            dense = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            for fmt in formats:
                w = random_weight(fmt, n, k, device)
                for m in map(int, args.batches.split(",")):
                    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                    if not args.no_tune and tune_key(w, m, x.dtype) not in tune.entries:
                        autotune(x, w, tune)
                        tune.save(args.tune_cache)
                    strategy, cfg = plan(w, m, x.dtype, tune)
                    bf16_fn, quant_fn = (lambda x=x, d=dense: x @ d.T), (lambda x=x, w=w: quant_matmul(x, w, tune))
                    bf16_ms, quant_ms = median_ms(bf16_fn), median_ms(quant_fn)
                    bf16_graph, quant_graph = device_ms(bf16_fn), device_ms(quant_fn)
                    moved = w.nbytes + x.numel() * 2 + m * n * 2
                    gbps = moved / quant_graph / 1e6
                    print(f"{model:12} {layer:8} {f'{n}x{k}':>12} {fmt:8} {m:>4} {bf16_ms * 1e3:7.1f} "
                          f"{quant_ms * 1e3:7.1f} {bf16_graph * 1e3:7.1f} {quant_graph * 1e3:7.1f} "
                          f"{bf16_graph / quant_graph:7.2f} {gbps:6.0f} {100 * gbps / roofline:6.1f}"
                          f"  {strategy.value} {cfg}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
