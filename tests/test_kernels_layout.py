"""The kernel layout and the load-time repack (no Triton launches), and the dispatcher's tile choices."""

from types import SimpleNamespace

import pytest
import torch
from gguf import GGMLQuantizationType as QType
from kernel_weights import K, N, gguf_weight, quant_linear_args

from cpmkit.convert.gguf.weight import KERNEL_TYPES as GGUF_KERNEL_TYPES
from cpmkit.convert.gguf.weight import pack_gguf
from cpmkit.convert.mlx.weight import pack_mlx
from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf import blocks
from cpmkit.formats.gguf.layout import BLOCKS
from cpmkit.kernels.dequant import DequantConfig
from cpmkit.kernels.dispatch import (
    Strategy,
    TuneCache,
    candidate_configs,
    default_config,
    plan,
    tune_key,
)
from cpmkit.kernels.gemm_tiled import GemmConfig
from cpmkit.kernels.gemv_splitk import MAX_M as GEMV_KERNEL_MAX_M
from cpmkit.kernels.gemv_splitk import GemvConfig
from cpmkit.kernels.gemv_stream import StreamConfig
from cpmkit.kernels.layout import pack_plane

# Linear shapes (N, K) of MiniCPM4-8B and MiniCPM5-1B, as in bench/kernels_gpu.py
MINICPM_SHAPES = [(4096, 4096), (256, 4096), (16384, 4096), (4096, 16384),
                  (2048, 1536), (256, 1536), (1536, 2048), (4608, 1536), (1536, 4608)]


def test_plane_golden_words():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_plane(codes, 4).tolist() == [[0x87654321 - (1 << 32)]]  # field e of the word is code e
    bits = torch.zeros((1, 32), dtype=torch.uint8)
    bits[0, [0, 5, 31]] = 1
    assert pack_plane(bits, 1).tolist() == [[(1 | 1 << 5 | 1 << 31) - (1 << 32)]]


@pytest.mark.parametrize("qtype", list(GGUF_KERNEL_TYPES), ids=lambda t: t.name)
def test_unpacked_blocks_repack_to_the_same_bytes(qtype):
    # the GGUF owners' packer is an independent inverse of the kernels' bit unpacking
    raw, _ = gguf_weight(qtype, seed=3)
    flat = raw.reshape(-1, BLOCKS[qtype].type_size)
    assert torch.equal(blocks.pack(blocks.unpack(flat, qtype)), flat)


@pytest.mark.parametrize("qtype,ratio", [(QType.Q8_0, 1.0), (QType.Q4_0, 1.0), (QType.Q5_0, 1.0),
                                         (QType.Q4_K, 4.625 / 4.5), (QType.Q5_K, 5.625 / 5.5), (QType.Q6_K, 1.0)])
def test_packed_size_against_the_file(qtype, ratio):
    raw, _ = gguf_weight(qtype)
    assert pack_gguf(raw, qtype, (N, K)).nbytes == pytest.approx(raw.numel() * ratio)


def test_mlx_packed_size_equals_the_source():
    args, _ = quant_linear_args("mlx-6bit-g64-float16")
    w = pack_mlx(args["weight"], args["scales"], args["biases"], 6, 64)
    source = sum(t.numel() * t.element_size() for t in (args["weight"], args["scales"], args["biases"]))
    assert w.nbytes == source and w.layout.bits == 6


def test_repack_rejects_a_wrong_shape():
    raw, _ = gguf_weight(QType.Q4_K)
    with pytest.raises(CpmkitError, match="ffn_down.weight: Q4_K data"):
        pack_gguf(raw, QType.Q4_K, (N, K + 256), name="ffn_down.weight")


def _valid(cfg, m: int, n: int, k: int) -> bool:
    if isinstance(cfg, StreamConfig):
        return cfg.num_warps in (1, 2, 4) and 1 <= cfg.split_k <= k // 32
    if isinstance(cfg, DequantConfig):
        return k % cfg.block_k == 0 and cfg.block_k % 32 == 0 and cfg.block_n >= 16
    return (k % cfg.block_k == 0 and cfg.block_k % 32 == 0 and 1 <= cfg.split_k <= k // cfg.block_k
            and (isinstance(cfg, GemvConfig) or min(cfg.block_m, cfg.block_n) >= 16))


@pytest.mark.parametrize("n,k", MINICPM_SHAPES)
def test_default_and_candidate_tiles_are_valid(n, k):
    w = SimpleNamespace(layout=GGUF_KERNEL_TYPES[QType.Q4_K].layout, n=n, k=k)  # what the STREAM tiles read
    for m in (1, 2, 8, 16, 64, 256, 4096):
        for strategy in Strategy:
            if strategy == Strategy.GEMV and m > GEMV_KERNEL_MAX_M or strategy == Strategy.STREAM and m > 4:
                continue
            assert _valid(default_config(strategy, m, n, k, w), m, n, k)
            candidates = candidate_configs(strategy, m, n, k, w)
            assert candidates and all(_valid(c, m, n, k) for c in candidates)


def test_tune_cache_round_trip_and_override(tmp_path):
    args, _ = quant_linear_args("gguf-Q4_K")
    w = pack_gguf(args["raw"], QType.Q4_K, (N, K))
    assert plan(w, 1, torch.bfloat16)[0] == Strategy.STREAM
    tune = TuneCache("NVIDIA H100 80GB HBM3")
    tuned = (Strategy.GEMM, GemmConfig(16, 64, 128, split_k=2))
    tune.entries[tune_key(w, 1, torch.bfloat16)] = tuned
    tune.entries[tune_key(w, 64, torch.bfloat16)] = (Strategy.GEMM, GemmConfig(64, 64, 64))
    path = tmp_path / "tune.json"
    tune.save(path)
    loaded = TuneCache.load(path, "NVIDIA H100 80GB HBM3")
    assert loaded.entries == tune.entries
    assert plan(w, 1, torch.bfloat16, loaded) == tuned
    assert plan(w, 1, torch.float16, loaded)[0] == Strategy.STREAM  # other dtype: not tuned
    with pytest.raises(CpmkitError, match="measured on 'NVIDIA H100 80GB HBM3'"):
        TuneCache.load(path, "NVIDIA H200")
    assert TuneCache.load(tmp_path / "missing.json", "x").entries == {}
