"""`tlq calibrate --dry-run`: per-rank memory estimate without loading weights."""
from __future__ import annotations

import shutil

import pytest

from tlq.calib.config import CalibConfig, get_method
from tlq.multirank.estimate import ASSUMED_TOKENS_PER_SAMPLE, estimate_memory, format_estimate
from tlq.cli import main
from tlq.schemes import get_scheme


def _cfg(model, tmp_path, method="tlq", device="cpu"):
    return CalibConfig(model=model, out=tmp_path / "out", method=get_method(method), scheme=get_scheme("w4a16"),
                       max_samples=4, device=device)


def test_sharding_splits_weights_but_not_the_layer_work(qwen2_vl_dir, tmp_path):
    one = estimate_memory(_cfg(qwen2_vl_dir, tmp_path), 1)
    two = estimate_memory(_cfg(qwen2_vl_dir, tmp_path), 2)
    assert one.tokens_exact and one.samples == 4 and one.tokens > 4 * 20  # counted with the processor
    assert [r.layers for r in two.ranks] == [range(1), range(1, 2)]
    assert sum(r.weights for r in two.ranks) == one.ranks[0].weights
    assert sum(r.extras for r in two.ranks) == one.ranks[0].extras
    assert all(r.results < one.ranks[0].results for r in two.ranks)  # ranks pack each finished layer
    assert all(r.layer_work == one.ranks[0].layer_work for r in two.ranks)  # one layer at a time either way
    assert all(r.host_peak < one.ranks[0].host_peak for r in two.ranks)
    table = format_estimate(two)
    assert "rank" in table and "host peak" in table and len(table.splitlines()) == 6


def test_config_only_folder_assumes_token_counts(qwen2_vl_dir, tmp_path):
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    shutil.copy(qwen2_vl_dir / "config.json", stand_in / "config.json")
    est = estimate_memory(_cfg(stand_in, tmp_path, device="cuda"), 2)
    real = estimate_memory(_cfg(qwen2_vl_dir, tmp_path, device="cuda"), 2)
    assert not est.tokens_exact and est.longest == ASSUMED_TOKENS_PER_SAMPLE
    assert [r.weights for r in est.ranks] == [r.weights for r in real.ranks]  # meta shapes == headers
    assert all(r.device_peak is not None for r in est.ranks)
    assert "ASSUMED" in format_estimate(est)


@pytest.mark.parametrize("nproc", [1, 2])
def test_dry_run_prints_one_row_per_rank(qwen2_vl_dir, tmp_path, capsys, nproc):
    main(["calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "o"), "--dry-run", "--nproc", str(nproc),
          "--max-samples", "2", "--method", "gptq"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == nproc
    assert not (tmp_path / "o").exists()



def test_dry_run_plans_cuda_without_a_gpu(qwen2_vl_dir, tmp_path, capsys, monkeypatch):
    """Users plan on a laptop before renting GPUs: --device cuda --dry-run needs no CUDA device."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "o"), "--dry-run", "--device", "cuda",
          "--max-samples", "2"])
    out = capsys.readouterr().out
    assert "device cuda" in out
    row = next(line for line in out.splitlines() if line.strip()[:1].isdigit())
    assert row.split()[-1] != "-"  # a device peak is estimated
    with pytest.raises(SystemExit) as exc:  # running for real still needs the GPU, with a one-line error
        main(["calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "o"), "--device", "cuda", "--max-samples", "2"])
    assert exc.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
