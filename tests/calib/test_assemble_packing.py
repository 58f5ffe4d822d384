"""`pack_rows` (tlq/calib/assemble.py): packing a linear a block of rows at a time stores exactly the
tensors `pack_linear` stores at once, for every layout the format has."""
from __future__ import annotations

import pytest
import torch

from tlq.calib.assemble import pack_rows
from tlq.format.checkpoint import pack_linear
from tlq.quant.qparams import quantize_rtn


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [96, 100])  # a multiple of the 32-row run and one that is not
@pytest.mark.parametrize("act_order", [False, True])
def test_blocks_of_rows_pack_to_the_same_tensors(symmetric, rows, act_order):
    g = torch.Generator().manual_seed(0)
    qw = quantize_rtn(torch.randn(rows, 256, generator=g), 4, 64, symmetric, torch.bfloat16)
    if act_order:
        qw.g_idx = (torch.randperm(256, generator=g) // 64).to(torch.int32)
    whole = pack_linear(qw, torch.bfloat16)
    blocks = pack_rows(qw, torch.bfloat16, chunk=32 * 256)  # 32 rows per block: 3-4 blocks
    assert set(blocks) == set(whole) == {"qweight", "scales"} | ({"qzeros"} if not symmetric else set()) | (
        {"g_idx"} if act_order else set())
    for key, t in whole.items():
        assert blocks[key].dtype == t.dtype and torch.equal(blocks[key], t), key


def test_one_block_when_the_linear_is_small():
    qw = quantize_rtn(torch.randn(64, 128), 4, 128, False, torch.float16)
    assert all(torch.equal(pack_rows(qw, torch.float16)[k], t) for k, t in pack_linear(qw, torch.float16).items())
