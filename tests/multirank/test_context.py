"""Each rank on its own GPU: --device cuda means cuda:LOCAL_RANK on every rank."""
from types import SimpleNamespace

import pytest

from tlq.api import make_config
from tlq.multirank import run
from tlq.multirank.context import rank_device


@pytest.mark.parametrize("device,local_rank,expected", [("cuda", 0, "cuda:0"), ("cuda", 3, "cuda:3"),
                                                         ("cuda:0", 1, "cuda:1"), ("cpu", 2, "cpu")])
def test_rank_device(device, local_rank, expected):
    assert rank_device(device, local_rank) == expected


def test_every_rank_calibrates_on_its_local_gpu(tmp_path, monkeypatch):
    seen = {}
    ctx = SimpleNamespace(local_rank=1, shutdown=lambda: None)
    monkeypatch.setattr(run, "init_rank", lambda device: ctx)
    monkeypatch.setattr(run, "_calibrate", lambda c, cfg, progress: seen.setdefault("device", cfg.device))
    cfg = make_config(tmp_path, tmp_path / "o", method="gptq", device="cuda")
    run.calibrate_distributed(cfg, progress=False)
    assert seen["device"] == "cuda:1" and cfg.device == "cuda"  # the caller's config is left as it was
