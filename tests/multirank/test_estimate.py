"""`tlq calibrate --dry-run`: per-rank memory estimate without loading weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tlq.calib.config import CalibConfig, get_method
from tlq.cli import main
from tlq.multirank.estimate import (
    GIB,
    estimate_memory,
    format_estimate,
    search_tokens,
    solve_bytes,
)
from tlq.schemes import get_scheme

CONFIGS = Path(__file__).parent / "configs"  # config.json only: the published shapes, no weights
# parameters of the published checkpoints (model cards), vision tower and embeddings included
PUBLISHED_PARAMS = {"qwen2-vl-7b": 8.29e9, "qwen2-vl-72b": 73.4e9, "llava-onevision-72b": 73.2e9}


def _cfg(model, tmp_path, method="tlq", device="cpu", max_samples=4, **settings):
    return CalibConfig(model=model, out=tmp_path / "out", method=get_method(method), scheme=get_scheme("w4a16"),
                       max_samples=max_samples, device=device, **settings)


def test_sharding_splits_weights_but_not_the_layer_work(qwen2_vl_dir, tmp_path):
    one = estimate_memory(_cfg(qwen2_vl_dir, tmp_path), 1)
    two = estimate_memory(_cfg(qwen2_vl_dir, tmp_path), 2)
    assert one.tokens_exact and one.samples == 4 and one.tokens > 4 * 20  # counted with the processor
    assert [r.layers for r in two.ranks] == [range(1), range(1, 2)]
    assert sum(r.weights for r in two.ranks) == one.ranks[0].weights
    assert sum(r.extras for r in two.ranks) == one.ranks[0].extras
    assert all(r.results == one.ranks[0].results for r in two.ranks)  # one layer's results in RAM either way
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
    assert not est.tokens_exact and est.samples == real.samples
    assert real.tokens / 2 < est.tokens < real.tokens * 2  # text assumed, images counted
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


def test_stated_calibration_size_on_a_config_only_folder(tmp_path):
    """--max-samples N --tokens-per-sample T: N samples of T tokens, more than the bundled set holds."""
    est = estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=256), 1, 1024)
    assert (est.samples, est.tokens, est.longest, est.tokens_exact) == (256, 256 * 1024, 1024, False)
    assert "256 samples x 1024 tokens" in format_estimate(est)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_config_only_fixtures_have_the_published_sizes(tmp_path, name):
    est = estimate_memory(_cfg(CONFIGS / name, tmp_path, device="cuda", max_samples=256), 1, 1024)
    params = (est.ranks[0].weights + est.ranks[0].extras) / 2  # bf16
    assert abs(params / PUBLISHED_PARAMS[name] - 1) < 0.01


def test_layer_work_is_flat_in_calibration_tokens(tmp_path):
    """Streaming statistics: 16x the tokens changes the streams, not the device's working set."""
    small = estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=16), 1, 1024)
    large = estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=256), 1, 1024)
    assert large.ranks[0].layer_work == small.ranks[0].layer_work
    assert large.ranks[0].streams > 10 * small.ranks[0].streams
    # TLQ (weight-only) judges its scales from the statistics: the search budget does not matter ...
    double = estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=256,
                                  search_tokens=8192), 1, 1024)
    assert double.ranks[0].layer_work == large.ranks[0].layer_work
    # ... while AWQ's token searches hold search tokens x K fp32
    awq, awq_double = (estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, method="awq", device="cuda",
                                            max_samples=256, search_tokens=st), 1, 1024) for st in (4096, 8192))
    assert awq_double.ranks[0].layer_work > awq.ranks[0].layer_work


def test_search_subset_and_solve_arithmetic():
    assert search_tokens([1024] * 256, 8192) == 8192
    assert search_tokens([100] * 10, 8192) == 1000
    assert search_tokens([9000, 10], 8192) == 9000  # the first drawn sample is always kept
    K, N = 1000, 200
    # corrected exposure on the CPU: M (as H), C, the exposure factor and H's Cholesky factor; on a
    # GPU C waits in host memory meanwhile
    assert solve_bytes(K, N, True, False) == 4 * K * K * 4 + 2 * N * K * 4
    assert solve_bytes(K, N, True, False, cuda=True) == 3 * K * K * 4 + 6 * N * K * 4
    assert solve_bytes(K, 10 * K, True, False) == 3 * K * K * 4 + 6 * 10 * K * K * 4  # wide: GPTQ's N x K
    assert solve_bytes(K, N, False, False) < solve_bytes(K, N, True, False) < solve_bytes(K, N, True, True)


def test_spilling_above_the_host_budget(tmp_path):
    """Streams over --host-memory go to files: RAM no longer holds 4 x tokens x hidden."""
    cfg = _cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=256)
    kept = estimate_memory(cfg, 1, 1024, host_memory_gib=64)
    spilled = estimate_memory(cfg, 1, 1024, host_memory_gib=1)
    assert not kept.ranks[0].spilled and spilled.ranks[0].spilled
    stream = 256 * 1024 * 3584 * 2
    assert kept.ranks[0].streams - spilled.ranks[0].streams > 3.9 * stream
    assert "host-memory" in format_estimate(spilled)
    # half of the budget: 4 x 1.75 GiB of streams stay in RAM under 16 GiB, not under 12
    assert not estimate_memory(cfg, 1, 1024, host_memory_gib=16).ranks[0].spilled
    assert estimate_memory(cfg, 1, 1024, host_memory_gib=12).ranks[0].spilled


def test_a_pipeline_stage_counts_its_fp_targets_ahead(tmp_path, monkeypatch):
    """Rank 0 takes its FP entry from the gradient pass and keeps no targets ahead; a later stage
    keeps k of them (TLQ_FP_PREFETCH_MB) beside the loop's streams: max(4, 3 + k) streams in RAM."""
    monkeypatch.setenv("TLQ_FP_PREFETCH_MB", str(3 * 1792))  # 3 streams of 256 x 1024 x 3584 bf16
    cfg = _cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=256)
    est = estimate_memory(cfg, 2, 1024, host_memory_gib=64)
    stream = 256 * 1024 * 3584 * 2
    assert not any(r.spilled for r in est.ranks)
    r0, r1 = est.ranks
    token_weights = 256 * 1024 * 2 * 4 * (len(r1.layers) - len(r0.layers))  # (layer, attn/mlp) -> [T] fp32
    assert r1.streams - r0.streams - token_weights == 2 * stream  # 6 streams against 4
    assert estimate_memory(cfg, 2, 1024, host_memory_gib=20).ranks[1].spilled  # 6 x 1.75 > 10 GiB
    assert not estimate_memory(cfg, 2, 1024, host_memory_gib=20).ranks[0].spilled  # 4 x 1.75 < 10 GiB


# The targets of issue 14 (item 6), on the published shapes, default `tlq` w4a16.

def test_qwen2_vl_7b_fits_16_gib_on_one_gpu(tmp_path):
    est = estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=256), 1, 1024)
    assert est.ranks[0].device_peak <= 16 * GIB


_72B = [(name, n) for name in ("qwen2-vl-72b", "llava-onevision-72b") for n in (4, 8)]


@pytest.mark.parametrize("name,nproc", _72B)
def test_72b_fits_20_gib_per_gpu(tmp_path, name, nproc):
    est = estimate_memory(_cfg(CONFIGS / name, tmp_path, device="cuda", max_samples=256), nproc, 1024)
    assert max(r.device_peak for r in est.ranks) <= 20 * GIB


@pytest.mark.parametrize("name,nproc", _72B)
def test_72b_host_is_the_stage_weights_plus_16_gib(tmp_path, name, nproc):
    est = estimate_memory(_cfg(CONFIGS / name, tmp_path, device="cuda", max_samples=256), nproc, 1024)
    assert all(r.host_peak <= r.weights + r.extras + 16 * GIB for r in est.ranks)


def test_72b_fits_20_gib_with_quantized_exposure(tmp_path):
    """Without the FP-target correction (no C, no exposure factor) 72B fits today."""
    from tlq.api import make_config
    cfg = make_config(CONFIGS / "qwen2-vl-72b", tmp_path / "out", exposure="quantized", device="cuda", max_samples=256)
    est = estimate_memory(cfg, 4, 1024)
    assert max(r.device_peak for r in est.ranks) <= 20 * GIB


def test_tokens_per_sample_is_for_the_dry_run_only(qwen2_vl_dir, tmp_path, capsys):
    main(["calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "o"), "--dry-run", "--max-samples", "8",
          "--tokens-per-sample", "300"])
    assert "8 samples x 300 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "o"), "--tokens-per-sample", "300"])
    assert exc.value.code == 2 and "--tokens-per-sample only states" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_only_folder_counts_vision_tokens_under_max_pixels(llava_onevision_dir, tmp_path):
    """Without a processor the images' anyres tiles are counted from config.json; --max-pixels
    lowers them as it lowers what the processor expands."""
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    shutil.copy(llava_onevision_dir / "config.json", stand_in / "config.json")
    full, small = (estimate_memory(_cfg(stand_in, tmp_path, max_pixels=m), 1) for m in (None, 1000))
    real_full, real_small = (estimate_memory(_cfg(llava_onevision_dir, tmp_path, max_pixels=m), 1)
                             for m in (None, 1000))
    assert real_small.tokens < real_full.tokens and small.tokens < full.tokens
    # text assumed, vision counted: the config-only drop equals the processor's
    assert full.tokens - small.tokens == real_full.tokens - real_small.tokens


def test_held_out_damping_counts_both_folds_and_stays_flat_in_tokens(tmp_path):
    """--damp-candidates: two folds' statistics and the choice's working set (about 2 more K x K of the
    widest group, the down projection's K = 18944 for Qwen2-VL-7B), still independent of the token count."""
    fixed, small, large = (estimate_memory(_cfg(CONFIGS / "qwen2-vl-7b", tmp_path, device="cuda", max_samples=n,
                                                damp_candidates=dc), 1, 1024)
                           for n, dc in ((256, ()), (16, (0.01, 0.1)), (256, (0.01, 0.1))))
    q = 18944 ** 2 * 4
    assert small.ranks[0].layer_work == large.ranks[0].layer_work
    assert 2 * q <= large.ranks[0].layer_work - fixed.ranks[0].layer_work <= 4 * q
