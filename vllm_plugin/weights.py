"""Pure-torch transforms between the TLQ packed layout and what vLLM's kernels take (no vLLM import).

All tensors here are in the GPTQ orientation of docs/format.md: codes [K, N] (input rows),
scales / zeros [n_groups, N]. Every transform is exact: the lifted or repacked weight
dequantizes to bit-identical values (tests/vllm_plugin/test_plugin_weights.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tlq.format.packing import unpack
from tlq.quant.qparams import dequantize_codes


@dataclass
class LoadedWeight:
    """One linear's loaded partition, unpacked.

    Attributes:
        codes: int32 [K, N] unsigned codes.
        scales: float [n_groups_stored, N] (all groups when g_idx is set, else this rank's).
        zeros: int32 [n_groups_stored, N] zero points, or None (symmetric).
        bits: code width.
        group_size: K channels per group (-1: one group).
        g_idx: int64 [n_shards, K] global group of each input channel per fused shard, or None.
        shard_sizes: output widths of the fused shards (q/k/v, gate/up), summing to N.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None
    shard_sizes: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return self.codes.shape[0]

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        """int64 [n_shards or 1, K] row of `scales` for each input channel."""
        if self.g_idx is not None:
            return self.g_idx.long()
        g = self.k if self.group_size == -1 else self.group_size
        return (torch.arange(self.k, device=self.codes.device) // g).unsqueeze(0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, computed in float32 then rounded once: the writer's formula
        (tlq.quant.qparams.dequantize_codes), per fused shard when each has its own g_idx."""
        gi = self.group_index()
        cols = []
        widths = self.shard_sizes if gi.shape[0] > 1 else (self.n,)
        start = 0
        for s, width in enumerate(widths):
            sl = slice(start, start + width)
            idx = gi[min(s, gi.shape[0] - 1)]
            zeros = None if self.zeros is None else self.zeros[idx][:, sl]
            cols.append(dequantize_codes(self.codes[:, sl], self.scales[idx][:, sl].float(), zeros, self.bits))
            start += width
        return torch.cat(cols, dim=1).t().contiguous().to(dtype)


def unpack_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """qweight int32 [ceil(K/32)*b, N] -> codes int32 [K, N]."""
    return unpack(qweight, bits, k, dim=0)


def unpack_along_n(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, ceil(N/32)*b] -> codes int32 [rows, ceil(N/32)*32] (padding kept; callers slice)."""
    return unpack(packed, bits, packed.shape[1] // bits * 32, dim=1)


def lift_to_uint4(codes: torch.Tensor, zeros: torch.Tensor | None, bits: int):
    """Re-express b-bit codes (b <= 4) as 4-bit codes with identical dequantized values.

    Asymmetric codes and zero points are already valid uint4 values. Symmetric codes use the
    offset 2**(b-1); shifting them by 8 - 2**(b-1) gives vLLM's uint4b8 (offset 8), so no zero
    points are needed: (q + 8 - 2**(b-1)) - 8 == q - 2**(b-1).
    """
    if bits > 4:
        raise ValueError(f"cannot lift {bits}-bit codes to 4 bits")
    if zeros is not None:
        return codes, zeros
    return codes + (8 - 2 ** (bits - 1)), None


def pack_gptq(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ int32 packing (value j of a word at shift j*bits) of 4- or 8-bit values along `dim`.

    Unlike the on-disk format this does not pad: the packed size must be a multiple of 32/bits.
    """
    per_word = 32 // bits
    x = values.to(torch.int64).movedim(dim, -1)
    if x.shape[-1] % per_word:
        raise ValueError(f"{x.shape[-1]} values do not fill whole int32 words of {per_word}")
    x = x.reshape(*x.shape[:-1], x.shape[-1] // per_word, per_word)
    shifts = torch.arange(per_word, device=x.device, dtype=torch.int64) * bits
    words = (x << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def act_order_permutation(g_idx: torch.Tensor, group_size: int):
    """(perm, first_group) making act-order groups contiguous, or None when they cannot be.

    After gathering input channels by `perm` (x[..., perm], codes[perm]), channel i belongs to
    local group i // group_size, i.e. global group first_group + i // group_size. That holds when
    every group present has exactly `group_size` channels in this partition (true for GPTQ
    act-order without tensor parallelism, and for row splits that keep groups whole).
    """
    k = g_idx.numel()
    if group_size == -1 or k % group_size:
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    ordered = g_idx.long()[perm]
    first = int(ordered[0])
    expected = first + torch.arange(k, device=g_idx.device) // group_size
    if not torch.equal(ordered, expected):
        return None
    return perm, first
