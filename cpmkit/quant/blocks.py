"""The hand-over between GGUF quantizers (``cpmkit.quant``) and block packers (``blocks.py``).

A quantizer chooses integer codes and per-block parameters; a packer lays them out as bytes. Every
field holds the values exactly as ggml's ``dequantize_row_*`` reads them back after unpacking the bits,
so packing is lossless and carries no arithmetic. Field names are ggml-common.h's block member names.

Per type (n = n_blocks; "stored" = before the dequantizer subtracts its offset):

| type        | codes (n, block_size)             | d         | m / dmin       | scales, mins (n, n_sub)               |
| ----------- | --------------------------------- | --------- | -------------- | ------------------------------------- |
| F32/F16/BF16| the value itself, (n, 1) in its   | -         | -              | -                                     |
|             | own dtype (float32/float16/bf16)  |           |                |                                       |
| Q8_0        | int8 -127..127                    | f16       | -              | -                                     |
| Q4_0 / Q5_0 | uint8 0..15 / 0..31 (minus 8/16)  | f16       | -              | -                                     |
| Q4_1 / Q5_1 | uint8 0..15 / 0..31               | f16       | m f16 (added)  | -                                     |
| Q2_K        | uint8 0..3                        | f16       | dmin f16       | uint8 0..15 each, 16 sub-blocks of 16 |
| Q3_K        | uint8 0..7 (minus 4)              | f16       | -              | scales uint8 0..63 (minus 32), 16     |
| Q4_K / Q5_K | uint8 0..15 / 0..31               | f16       | dmin f16       | uint8 0..63 each, 8 sub-blocks of 32  |
| Q6_K        | uint8 0..63 (minus 32)            | f16       | -              | scales int8, 16 sub-blocks of 16      |
| TQ1_0/TQ2_0 | uint8 0..2 (minus 1)              | f16       | -              | -                                     |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QType


@dataclass(frozen=True)
class QuantizedBlocks:
    qtype: QType
    codes: torch.Tensor  # (n_blocks, block_size), see the table above
    d: torch.Tensor | None = None  # (n_blocks,) float16 block / super-block scale
    m: torch.Tensor | None = None  # (n_blocks,) float16, Q4_1/Q5_1 block minimum (value = q*d + m)
    dmin: torch.Tensor | None = None  # (n_blocks,) float16, K-quant min scale (value = d*sc*q - dmin*mn)
    scales: torch.Tensor | None = None  # (n_blocks, n_sub) sub-block scales
    mins: torch.Tensor | None = None  # (n_blocks, n_sub) sub-block mins

    def __post_init__(self) -> None:
        assert self.codes.dim() == 2, self.codes.shape
        n = self.codes.shape[0]
        for name in ("d", "m", "dmin"):
            t = getattr(self, name)
            assert t is None or (t.shape == (n,) and t.dtype == torch.float16), (name, t.shape, t.dtype)
        for name in ("scales", "mins"):
            t = getattr(self, name)
            assert t is None or (t.dim() == 2 and t.shape[0] == n), (name, t.shape)

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[0]
