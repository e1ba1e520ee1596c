"""The Marlin bytes of OpenBMB's CPM.cu checkpoints (what its ``scripts/model_convert/gptq2marlin.py`` writes;
../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §4).

A symmetric 4-bit GPTQ linear with groups of 128 (codes ``q`` in 0..15, value ``(q - 8) * scale``) becomes:

* ``qweight`` int32 ``[K/16, 2N]``: 16x16 tiles of the ``[K, N]`` code matrix, each word holding the eight
  codes one thread of a ``mma.m16n8k16`` B fragment loads. Code ``q[k, n]`` sits in word
  ``[k // 16, 128 (n // 64) + 16 (n % 8) + 4 ((k % 8) // 2) + (n // 16) % 4]`` at nibble
  ``4 (k % 2) + 2 ((n % 16) // 8) + (k % 16) // 8`` (bits ``4 p .. 4 p + 3``);
* ``scales`` ``[K/128, N]``, the GPTQ dtype kept, each run of 64 columns an 8x8 transpose (its own inverse);
* no ``qzeros`` and no ``g_idx`` (CPM.cu's loader refuses them).

q/k/v are fused into ``qkv_proj`` and gate/up into ``gate_up_proj`` along N (the packed GPTQ tensors are
concatenated, then repacked as one matrix); everything else keeps its name, dtype and bytes. One file,
``model_gptq.safetensors``. K must be a multiple of 16 and N of 64.
"""

from __future__ import annotations

import torch

from cpmkit.errors import CpmkitError

WEIGHTS_FILE = "model_gptq.safetensors"
BITS, GROUP_SIZE = 4, 128
TILE_K, TILE_N = 16, 64
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
UNFUSED = ("self_attn.o_proj", "mlp.down_proj")

# [K, N] viewed as (r, e, b, s, c, j, h, a): k = 16 r + 8 e + 2 b + s, n = 64 c + 16 j + 8 h + a; a word is
# (r, c, a, b, j) and its nibble (s, h, e)
_CODE_AXES = (0, 4, 7, 2, 5, 3, 6, 1)
_WORD_AXES = (0, 7, 3, 5, 1, 4, 6, 2)  # the inverse permutation


def check_shape(k: int, n: int, name: str) -> None:
    if k % TILE_K or n % TILE_N or k % GROUP_SIZE:
        raise CpmkitError(f"{name}: {n}x{k} does not tile: Marlin needs input features divisible by "
                          f"{GROUP_SIZE} and output features by {TILE_N}")


def pack_marlin(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[K, N]`` (0..15) -> int32 ``[K/16, 2N]``."""
    k, n = codes.shape
    nibbles = codes.to(torch.int64).reshape(k // 16, 2, 4, 2, n // 64, 4, 2, 8).permute(_CODE_AXES)
    nibbles = nibbles.reshape(k // 16, 2 * n, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_marlin(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[K/16, 2N]`` -> uint8 codes ``[K, N]``."""
    rows, cols = qweight.shape
    n = cols // 2
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = ((qweight.unsqueeze(-1) >> shifts) & 15).to(torch.uint8)
    nibbles = nibbles.reshape(rows, n // 64, 8, 4, 4, 2, 2, 2).permute(_WORD_AXES)
    return nibbles.reshape(k, n)


def permute_scales(scales: torch.Tensor) -> torch.Tensor:
    """``[K/128, N]`` GPTQ scales <-> Marlin's (the 8x8 transpose in every 64 columns is its own inverse)."""
    groups, n = scales.shape
    return scales.reshape(groups, n // 64, 8, 8).transpose(-1, -2).reshape(groups, n).contiguous()


def fused_name(module: str) -> tuple[str, int] | None:
    """``model.layers.3.self_attn.k_proj`` -> (``model.layers.3.self_attn.qkv_proj``, 1): the fused tensor a
    linear lives in and its place along N; None for a linear kept on its own."""
    prefix, _, rest = module.partition(".layers.")
    index, _, local = rest.partition(".")
    for fused, parts in FUSED.items():
        if local in parts:
            return f"{prefix}.layers.{index}.{fused}", parts.index(local)
    return None
