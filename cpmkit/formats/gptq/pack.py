"""Bit layouts of GPTQ checkpoints (AutoGPTQ ``QuantLinear.pack``, GPTQModel ``pack_block``) and of
compressed-tensors ``pack-quantized`` (``pack_to_int32``), which share one: codes of ``bits`` bits laid end to
end, LSB first, along one dimension, read as int32 words. For 2, 4 and 8 bits a word holds 32/bits whole codes
(code ``j`` of a 32-code run at bit ``bits * j``); for 3 bits 32 codes fill three words and two codes straddle
a word boundary (AutoGPTQ's 10|1|10|1|10 scheme is exactly this dense stream).

Per linear ``W [N, K]`` (../shared/formats/GPTQ_AWQ_MARLIN_TERNARY.md §1, checked against AutoGPTQ and
compressed-tensors sources):

    qweight    int32 [K * bits / 32, N]       codes packed along K (input features)
    qzeros     int32 [groups, N * bits / 32]  zero points packed along N; v1 ("gptq") stores zero - 1,
                                              v2 ("gptq_v2") the zero itself
    scales     float16 [groups, N]
    g_idx      int32 [K]                      group of each input feature

compressed-tensors: ``weight_packed`` = qweight transposed ``[N, K * bits / 32]``, ``weight_zero_point`` = the
v2 qzeros transposed ``[N * bits / 32, groups]`` (asymmetric schemes only), ``weight_scale [N, groups]``.
"""

from __future__ import annotations

import torch

from cpmkit.errors import CpmkitError

WORD_BITS = 32
RUN = 32  # codes per run: a whole number of words for every width (3 bits: 3 words)
PACK_BITS = (2, 3, 4, 8)
_U32 = (1 << 32) - 1


def _check(bits: int, length: int, what: str) -> None:
    if bits not in PACK_BITS:
        raise CpmkitError(f"GPTQ packing: bits={bits} is not supported; use one of {PACK_BITS}")
    if length % RUN:
        raise CpmkitError(f"GPTQ packing: {what} of {length} codes is not a multiple of {RUN}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[L, M]`` (each ``< 2**bits``) -> int32 ``[L * bits / 32, M]``, packed along L."""
    length, m = codes.shape
    _check(bits, length, "a column")
    runs = codes.to(torch.int64).reshape(length // RUN, RUN, m)
    words = torch.zeros(length // RUN, bits, m, dtype=torch.int64)
    for j in range(RUN):
        word, shift = divmod(j * bits, WORD_BITS)
        words[:, word] |= (runs[:, j] << shift) & _U32
        if shift + bits > WORD_BITS:  # the code's high bits start the next word
            words[:, word + 1] |= runs[:, j] >> (WORD_BITS - shift)
    words = words.reshape(length // RUN * bits, m)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[length * bits / 32, M]`` -> uint8 codes ``[length, M]``."""
    _check(bits, length, "a column")
    if words.dim() != 2 or words.shape[0] != length * bits // WORD_BITS:
        raise CpmkitError(f"GPTQ unpacking: {tuple(words.shape)} words do not hold {length} {bits}-bit codes")
    w = (words.to(torch.int64) & _U32).reshape(length // RUN, bits, -1)
    mask = (1 << bits) - 1
    codes = torch.empty(length // RUN, RUN, w.shape[-1], dtype=torch.int64, device=words.device)
    for j in range(RUN):
        word, shift = divmod(j * bits, WORD_BITS)
        value = w[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (w[:, word + 1] << (WORD_BITS - shift))
        codes[:, j] = value & mask
    return codes.reshape(length, -1).to(torch.uint8)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` (row-major like the weight) -> GPTQ ``qweight`` int32 ``[K * bits / 32, N]``."""
    return pack_rows(codes.T.contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """GPTQ ``qweight`` -> codes ``[N, K]``."""
    return unpack_rows(qweight, bits, k).T


def pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """Zero points ``[N, groups]`` (integers in ``[0, 2**bits)``) -> ``qzeros`` int32 ``[groups, N * bits / 32]``.
    ``v1``: store ``zero - 1`` (checkpoint_format "gptq"); refused when a zero is 0, which v1 cannot hold (its
    -1 would corrupt the neighbouring fields, as AutoGPTQ's packer does)."""
    if v1:
        if bool((zeros == 0).any()):
            raise CpmkitError("GPTQ v1 (checkpoint_format gptq) cannot store a zero point of 0; write gptq_v2")
        zeros = zeros.to(torch.int16) - 1
    return pack_rows(zeros.to(torch.uint8).contiguous(), bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, n: int, v1: bool) -> torch.Tensor:
    """``qzeros`` -> zero points ``[N, groups]`` (int16; v1 adds the 1 back, without masking, as vLLM does)."""
    zeros = unpack_rows(qzeros.T.contiguous(), bits, n).to(torch.int16)
    return zeros + 1 if v1 else zeros
