"""Every method x scheme on both tiny architectures, and resumption after a kill."""
import json
import os
import subprocess
import sys

import pytest
import torch
from calibrate_cli import calibrate_cli

from tlq import calibrate
from tlq.calib.config import METHODS, CalibConfig, get_method
from tlq.format.checkpoint import dequantized_state_dict, verify_checkpoint
from tlq.schemes import get_scheme

SCHEMES = ("w3a16", "w4a16", "w4a8", "w8a16")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_and_scheme_writes_a_readable_checkpoint(tiny_model_dir, tmp_path, method):
    for scheme in SCHEMES:
        cfg = CalibConfig(model=tiny_model_dir, out=tmp_path / scheme, method=get_method(method),
                          scheme=get_scheme(scheme), max_samples=4)
        info = verify_checkpoint(calibrate(cfg, progress=False))
        assert info.quant_config["scheme"] == scheme and info.quant_config["method"] == method
        weights = dequantized_state_dict(info)
        layer = next(iter(info.quantized_layers))
        w = weights[f"{layer}.weight"]
        assert list(w.shape) == info.quantized_layers[layer]["shape"] and torch.isfinite(w).all()
        if method != "rtn":
            report = json.loads((info.path / "tlq_report.json").read_text())
            assert len(report["layers"]) == 2 and report["layers"][0]["rel_text"] is not None
            stats = info.manifest["calibration"]["token_stats"]
            assert stats["tokens_per_modality"]["vision"] > 0 and stats["tokens_per_modality"]["answer"] > 0


def _tensor_hashes(path):
    info = verify_checkpoint(path)
    return info.manifest["files"]["model.safetensors"]


def test_resume_after_kill_gives_identical_checkpoint(qwen2_vl_dir, tmp_path):
    flags = ("--method", "tlq", "--scheme", "w4a16", "--max-samples", "4")
    full = calibrate_cli(qwen2_vl_dir, tmp_path / "full", *flags)
    assert full.returncode == 0, full.stderr
    killed = calibrate_cli(qwen2_vl_dir, tmp_path / "resumed", *flags, die_after_layer=0)
    assert killed.returncode == 17, killed.stderr
    assert not (tmp_path / "resumed").exists(), "nothing half-written may look like a checkpoint"
    work = tmp_path / ".resumed.work"
    assert (work / "layer_0000.pt").is_file() and not (work / "layer_0001.pt").exists()
    resumed = calibrate_cli(qwen2_vl_dir, tmp_path / "resumed", *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _tensor_hashes(tmp_path / "full") == _tensor_hashes(tmp_path / "resumed")
    assert not work.exists(), "work folder removed after success"


def test_resume_ignores_work_of_a_different_run(qwen2_vl_dir, tmp_path):
    base = dict(model=qwen2_vl_dir, out=tmp_path / "ck", scheme=get_scheme("w4a16"), max_samples=4)
    env_die = {"TLQ_TEST_DIE_AFTER_LAYER": "0"}
    script = ("import sys; from tlq.calib.config import *; from tlq import calibrate; "
              "from tlq.schemes import get_scheme; "
              f"calibrate(CalibConfig(model={str(qwen2_vl_dir)!r}, out={str(tmp_path / 'ck')!r}, "
              "method=get_method('gptq'), scheme=get_scheme('w4a16'), max_samples=4), progress=False)")
    r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env_die), capture_output=True)
    assert r.returncode == 17
    # same output folder, other method: the stale gptq layer must not be reused
    out = calibrate(CalibConfig(method=get_method("tlq"), **base), progress=False)
    fresh = calibrate(CalibConfig(method=get_method("tlq"), **{**base, "out": tmp_path / "fresh"}), progress=False)
    assert _tensor_hashes(out) == _tensor_hashes(fresh)


def test_methods_differ_and_tlq_uses_token_weights(qwen2_vl_dir, tmp_path):
    hashes = {}
    for method in ("rtn", "gptq", "tlq"):
        cfg = CalibConfig(model=qwen2_vl_dir, out=tmp_path / method, method=get_method(method),
                          scheme=get_scheme("w3a16"), max_samples=4)
        hashes[method] = _tensor_hashes(calibrate(cfg, progress=False))
    assert len(set(hashes.values())) == 3
    info = verify_checkpoint(tmp_path / "tlq")
    q = info.manifest["calibration"]["token_stats"]["weight_quantiles"]
    assert q["vision"] != q["answer"], "token weights are not uniform"
    calibration = info.manifest["calibration"]
    assert (calibration["damp"], calibration["exposure_strength"]) == (0.1, 0.5)  # the method's defaults


def test_solver_settings_default_to_the_method(tmp_path):
    tlq, gptq = get_method("tlq"), get_method("gptq")
    cfg = CalibConfig(model=tmp_path, out=tmp_path / "a", method=tlq, scheme=get_scheme("w4a16"))
    assert (cfg.damp, cfg.exposure_strength) == (tlq.damp, tlq.exposure_strength) == (0.1, 0.5)
    cfg = CalibConfig(model=tmp_path, out=tmp_path / "b", method=gptq, scheme=get_scheme("w4a16"))
    assert (cfg.damp, cfg.exposure_strength) == (0.01, 1.0)
    cfg = CalibConfig(model=tmp_path, out=tmp_path / "c", method=tlq, scheme=get_scheme("w4a16"), damp=0.02,
                      exposure_strength=1.0)
    assert (cfg.damp, cfg.exposure_strength) == (0.02, 1.0)
    assert cfg.run_key()["damp"] == 0.02
