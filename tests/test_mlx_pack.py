"""MLX code packing: golden words, a big-integer reference for every bit width, round trips, errors."""

import pytest
import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats.mlx.pack import PACK_BITS, pack_codes, packed_width, unpack_codes


def reference_words(row: list[int], bits: int) -> list[int]:
    """The row as one LSB-first bit stream (a Python int), cut into 32-bit words."""
    stream = sum(code << (i * bits) for i, code in enumerate(row))
    return [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(len(row) * bits // 32)]


def as_int_list(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.view(torch.int32).tolist()]


def test_golden_4_bit_word():
    # The mx.quantize docstring's example: element 0 is bits 0-3 of word 0, element 1 bits 4-7.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert as_int_list(pack_codes(codes, 4)[0]) == [0x87654321]


def test_golden_3_bit_words_straddle():
    # 32 codes of 3 bits = 3 words; code 10 occupies bits 30-32, across words 0 and 1.
    codes = torch.zeros((1, 32), dtype=torch.uint8)
    codes[0, 10] = 0b111
    assert as_int_list(pack_codes(codes, 3)[0]) == [0xC0000000, 0x00000001, 0]


@pytest.mark.parametrize("bits", PACK_BITS)
def test_pack_matches_bit_stream_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 96), generator=gen, dtype=torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.uint32 and tuple(words.shape) == (3, 96 * bits // 32)
    for row, packed in zip(codes.tolist(), words):
        assert as_int_list(packed) == reference_words(row, bits)


@pytest.mark.parametrize("bits", PACK_BITS)
def test_round_trip_keeps_leading_dims(bits):
    gen = torch.Generator().manual_seed(100 + bits)
    codes = torch.randint(0, 1 << bits, (2, 5, 256), generator=gen, dtype=torch.uint8)
    words = pack_codes(codes, bits)
    assert tuple(words.shape) == (2, 5, packed_width(256, bits))
    assert torch.equal(unpack_codes(words, bits, 256), codes)


@pytest.mark.parametrize("bits", PACK_BITS)
def test_steps_match_bit_stream_reference(bits, monkeypatch):
    # 36 packs (288 bytes at 8 bits) in steps of 5: seven full steps and a partial one.
    monkeypatch.setattr("cpmkit.formats.mlx.pack.STEP_PACKS", 5)
    gen = torch.Generator().manual_seed(200 + bits)
    codes = torch.randint(0, 1 << bits, (3, 96), generator=gen, dtype=torch.uint8)
    words = pack_codes(codes, bits)
    for row, packed in zip(codes.tolist(), words):
        assert as_int_list(packed) == reference_words(row, bits)
    assert torch.equal(unpack_codes(words, bits, 96), codes)
    if bits < 8:
        codes[2, 95] = 1 << bits  # in the last step only
        with pytest.raises(CpmkitError, match=f"a code is {1 << bits}, too large"):
            pack_codes(codes, bits)


@pytest.mark.parametrize("bits", (3, 4, 8))
def test_packs_views_and_into_out(bits):
    gen = torch.Generator().manual_seed(300 + bits)
    storage = torch.randint(0, 1 << bits, (1 + 4 * 64,), generator=gen, dtype=torch.uint8)
    codes = storage[1:].view(4, 64)  # starts 1 byte into its storage: not 8-byte aligned
    expected = [reference_words(row, bits) for row in codes.tolist()]
    assert [as_int_list(words) for words in pack_codes(codes, bits)] == expected
    assert [as_int_list(words) for words in pack_codes(codes.t().contiguous().t(), bits)] == expected
    width = packed_width(64, bits)
    out = torch.zeros((6, width), dtype=torch.uint32)
    assert pack_codes(codes, bits, out=out[1:5]).data_ptr() == out[1:5].data_ptr()
    assert [as_int_list(words) for words in out[1:5]] == expected
    assert as_int_list(out[0]) == [0] * width and as_int_list(out[5]) == [0] * width


def test_rejects_bad_input():
    with pytest.raises(CpmkitError, match="bits=7"):
        pack_codes(torch.zeros((1, 32), dtype=torch.uint8), 7)
    with pytest.raises(CpmkitError, match="whole uint32 words"):
        pack_codes(torch.zeros((1, 20), dtype=torch.uint8), 4)
    with pytest.raises(CpmkitError, match="too large for 3 bits"):
        pack_codes(torch.full((1, 32), 8, dtype=torch.uint8), 3)
    codes = torch.zeros((2, 32), dtype=torch.uint8)
    with pytest.raises(CpmkitError, match=r"out must be contiguous uint32 of shape \(2, 4\)"):
        pack_codes(codes, 4, out=torch.zeros((2, 4), dtype=torch.int32))
    with pytest.raises(CpmkitError, match="out must be"):
        pack_codes(codes, 4, out=torch.zeros((2, 5), dtype=torch.uint32))
    with pytest.raises(CpmkitError, match="got strided"):
        pack_codes(codes, 4, out=torch.zeros((4, 2), dtype=torch.uint32).t())
    with pytest.raises(CpmkitError, match="expected last dimension 12"):
        unpack_codes(torch.zeros((1, 8), dtype=torch.uint32), 3, 128)
