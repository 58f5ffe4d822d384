import pytest
import torch

from tlq.format.packing import pack, packed_length, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(128, 64), (96, 7), (33, 5), (1, 1), (200, 45)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_roundtrip(bits, shape, dim):
    g = torch.Generator().manual_seed(bits * 1000 + shape[0])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    words = pack(codes, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == packed_length(shape[dim], bits)
    assert torch.equal(unpack(words, bits, shape[dim], dim), codes)


def test_gptq_layout_for_4_bits():
    # code j of column 0 sits in word j // 8 at shift 4 * (j % 8)
    codes = torch.arange(16, dtype=torch.int32).remainder(16).reshape(16, 1)
    words = pack(codes, 4)
    expected0 = sum(j << (4 * j) for j in range(8))
    assert int(words[0, 0]) & 0xFFFFFFFF == expected0


def test_three_bit_straddles_words():
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10, 0] = 0b111  # bits 30, 31 of word 0 and bit 0 of word 1
    words = pack(codes, 3)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0b11 << 30
    assert int(words[1, 0]) == 1


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError):
        pack(torch.full((32, 1), 16, dtype=torch.int32), 4)
