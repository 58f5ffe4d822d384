"""Row windows: which whole groups each tensor-parallel rank loads when its input slice cuts a group."""
from __future__ import annotations

import pytest

from tlq.format.tensor_parallel import misaligned, row_unit, row_window, tp_advice, whole_group_sizes


def test_row_unit_counts_runs_and_groups():
    assert row_unit(64) == 64 and row_unit(128) == 128
    assert row_unit(-1) == 32 and row_unit(128, act_order=True) == 32


@pytest.mark.parametrize("k, tp, unit", [(29568, 8, 128), (2816, 4, 128), (640, 2, 128), (3696 * 2, 2, 32)])
def test_windows_cover_each_slice_with_whole_units(k, tp, unit):
    k_part = k // tp
    for rank in range(tp):
        w = row_window(k_part, rank, unit)
        assert w.start % unit == 0 and w.length % unit == 0
        assert w.start + w.pad_front == rank * k_part
        assert w.length - w.pad_front - w.pad_back == k_part
        assert 0 <= w.pad_front < unit and 0 <= w.pad_back < unit


def test_aligned_split_is_the_plain_slice():
    w = row_window(1408, 1, 128)
    assert (w.start, w.length, w.padded) == (1408, 1408, False)


def test_qwen2_vl_72b_down_proj_at_tp8():
    """The field's complaint: 29568 / 8 = 3696 inputs per rank, 28.875 groups of 128."""
    assert misaligned(29568, 8, 128) and misaligned(29568, 2, 128) and not misaligned(29568, 1, 128)  # 231 groups
    w = row_window(3696, 1, 128)
    assert (w.start, w.length, w.pad_front, w.pad_back) == (3584, 3840, 112, 32)


def test_advice_names_layers_and_offers_a_group_size():
    layers = {"model.layers.0.mlp.down_proj": 640, "model.layers.0.self_attn.o_proj": 256}
    note = tp_advice(layers, 2, 128)
    assert "down_proj (640 inputs -> 320 per rank)" in note and "--group-size 64" in note
    assert "o_proj" not in note
    assert tp_advice(layers, 2, 64) is None
    assert whole_group_sizes([29568, 8192], 8) == []
    assert "no servable group size" in tp_advice({"mlp.down_proj": 29568}, 8, 128)
