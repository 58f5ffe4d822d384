"""Bit packing of integer codes into int32 words (docs/format.md, "Packing").

Codes are packed as a little-endian bit stream along one dimension: code j of a
run of 32 codes occupies bits [j*b, (j+1)*b) of the run's b consecutive int32 words.
For b in {2, 4, 8} this is exactly the GPTQ layout (code j in word j // (32/b) at
shift (j % (32/b)) * b); for b = 3 a code may straddle two words. The packed
dimension is padded with zero codes to a multiple of 32, so any length packs.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
RUN = 32  # codes per run; a run packs into `bits` int32 words


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words holding `length` codes of `bits` bits."""
    return -(-length // RUN) * bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along `dim` of a 2-D tensor into int32 words."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError("pack expects a 2-D tensor")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if dim == 1:
        return pack(codes.t(), bits, 0).t().contiguous()
    x = codes.to(torch.int32)
    length, cols = x.shape
    padded = -(-length // RUN) * RUN
    if padded != length:
        x = torch.cat([x, x.new_zeros(padded - length, cols)])
    runs = x.reshape(padded // RUN, RUN, cols)
    # bit `b` of code `c` is bit number f = c * bits + b of the run's stream: word f // 32,
    # position f % 32. One OR per stream bit keeps the scratch at one int64 per output word.
    words = torch.zeros(padded // RUN, bits, cols, dtype=torch.int64)
    for f in range(RUN * bits):
        code, bit = divmod(f, bits)
        word, position = divmod(f, RUN)
        words[:, word] |= ((runs[:, code] >> bit) & 1).to(torch.int64) << position
    words = words.reshape(padded // RUN * bits, cols)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).contiguous()


def unpack(words: torch.Tensor, bits: int, length: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> int32 codes, keeping the first `length` along `dim`."""
    _check_bits(bits)
    if dim == 1:
        return unpack(words.t(), bits, length, 0).t().contiguous()
    n_words, cols = words.shape
    if n_words % bits or length > n_words // bits * RUN:
        raise ValueError(f"{n_words} words of {bits}-bit codes cannot hold {length} codes")
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(RUN, dtype=torch.int64).reshape(1, RUN, 1)
    bitstream = ((w.reshape(-1, 1, cols) >> shifts) & 1).reshape(n_words // bits, bits * RUN, cols)
    per_code = bitstream.reshape(n_words // bits, RUN, bits, cols)
    bit_weights = (torch.ones(1, dtype=torch.int64) << torch.arange(bits, dtype=torch.int64)).reshape(1, 1, bits, 1)
    codes = (per_code * bit_weights).sum(2).reshape(-1, cols)
    return codes[:length].to(torch.int32).contiguous()
