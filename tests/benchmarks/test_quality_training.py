"""The seeded training script of the benchmark fixtures (benchmarks/fixtures/train.py), at toy size."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.fixtures import train
from benchmarks.fixtures.models import ModelSpec


def _toy(arch: str) -> train.TrainConfig:
    spec = ModelSpec(arch, hidden=128, intermediate=256, layers=1, heads=2, kv_heads=1, vision_embed=64,
                     vision_depth=1, vision_heads=1, vision_mlp=128)
    return train.TrainConfig(spec=spec, steps=3, batch_size=2, color_steps=1, text_every=2, warmup=1)


@pytest.mark.parametrize("arch", train.ARCHS)
def test_training_is_deterministic_and_cached_by_config(arch, tmp_path):
    cfg = _toy(arch)
    first = train.ensure_trained(cfg, tmp_path, log=lambda msg: None)
    again = train.train(cfg, tmp_path / "again", log=lambda msg: None)
    assert (first / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    info = json.loads((first / "tlq_trained.json").read_text())
    assert info["loss_every_step"] == again["loss_every_step"] and len(info["loss_every_step"]) == 3
    assert json.loads((first / "config.json").read_text())["dtype"] == "bfloat16"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert train.ensure_trained(cfg, tmp_path) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = replace(cfg, lr=cfg.lr / 2)
    assert train.model_dir(other, tmp_path) != first  # another config, another cache entry


def test_lr_schedule_warms_up_and_decays_to_the_floor():
    cfg = replace(_toy("qwen2-vl"), steps=100, warmup=10)
    assert train.lr_at(cfg, 0) == pytest.approx(cfg.lr / 10)
    assert train.lr_at(cfg, 9) == pytest.approx(cfg.lr)
    assert train.lr_at(cfg, 99) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)
    assert all(train.lr_at(cfg, s) >= train.lr_at(cfg, s + 1) for s in range(10, 99))
