"""Stage planning, tensor ownership and the torchrun command line (no processes started)."""
from __future__ import annotations

import sys

import pytest

from tlq.adapters import adapter_by_name
from tlq.errors import TLQError
from tlq.multirank.launch import PORTS, free_port, strip_nproc, torchrun_command
from tlq.multirank.plan import owner, split_layers


def _stage_costs(stages, sizes, first, last):
    costs = [sum(sizes[i] for i in s) for s in stages]
    costs[0] += first
    costs[-1] += last
    return costs


def test_split_layers_is_contiguous_and_balances_bytes():
    stages = split_layers([10] * 8, first_extra=25, last_extra=5, world=3)
    assert [i for s in stages for i in s] == list(range(8))  # contiguous, complete, in order
    assert all(len(s) >= 1 for s in stages)
    # rank 0 carries the vision tower: it gets fewer layers; the largest rank is as small as possible
    assert len(stages[0]) < len(stages[1])
    best = min(max(_stage_costs([range(a), range(a, b), range(b, 8)], [10] * 8, 25, 5))
               for a in range(1, 7) for b in range(a + 1, 8))
    assert max(_stage_costs(stages, [10] * 8, 25, 5)) == best


def test_split_layers_even_when_extras_are_small():
    assert split_layers([7] * 8, 1, 1, 2) == [range(4), range(4, 8)]
    assert split_layers([7] * 2, 1, 1, 2) == [range(1), range(1, 2)]
    assert split_layers([7] * 3, 0, 0, 1) == [range(3)]


def test_more_ranks_than_layers_is_a_clear_error():
    with pytest.raises(TLQError, match="--nproc between 1 and 2"):
        split_layers([1, 1], 0, 0, 3)


def test_owner_of_tensors():
    adapter = adapter_by_name("qwen2-vl")
    stages = [range(2), range(2, 3), range(3, 5)]
    assert owner("model.language_model.layers.1.mlp.up_proj.weight", adapter, stages) == 0
    assert owner("model.language_model.layers.2.input_layernorm.weight", adapter, stages) == 1
    assert owner("model.language_model.layers.4.self_attn.q_proj.bias", adapter, stages) == 2
    assert owner("lm_head.weight", adapter, stages) == 2
    assert owner("model.language_model.norm.weight", adapter, stages) == 2
    assert owner("model.language_model.embed_tokens.weight", adapter, stages) == 0
    assert owner("model.visual.blocks.0.attn.qkv.weight", adapter, stages) == 0


def test_torchrun_command_drops_nproc_and_keeps_the_rest():
    argv = ["calibrate", "m", "--out", "o", "--nproc", "4", "--method", "gptq", "--nproc=4", "--quiet"]
    assert strip_nproc(argv) == ["calibrate", "m", "--out", "o", "--method", "gptq", "--quiet"]
    cmd = torchrun_command(4, argv, 18350)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[cmd.index("--master-port") + 1] == "18350"
    assert cmd[cmd.index("-m", 3):] == ["-m", "tlq", "calibrate", "m", "--out", "o", "--method", "gptq", "--quiet"]


def test_free_port_is_in_the_project_range(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert free_port() in PORTS
    monkeypatch.setenv("MASTER_PORT", "18399")
    assert free_port() == 18399


def test_launch_refuses_nesting_under_torchrun(monkeypatch):
    from tlq.multirank.launch import launch_torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TLQError, match="leave --nproc out"):
        launch_torchrun(2, ["calibrate", "m", "--out", "o", "--nproc", "2"])
