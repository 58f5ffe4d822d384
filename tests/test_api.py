"""The public API (tlq/api.py): tlq.calibrate / tlq.verify, the runner table, the CLI over them."""
import logging

import pytest

import tlq
from tlq.api import RUNNERS, choose_runner, make_config
from tlq.cli import main
from tlq.errors import CheckpointError, TLQError
from tlq.multirank.writer import tensor_hashes


def test_calibrate_by_names_matches_the_cli_and_verifies(qwen2_vl_dir, tmp_path):
    ckpt = tlq.calibrate(qwen2_vl_dir, out=tmp_path / "api", method="rtn", scheme="w3a16", group_size=64)
    main_args = ["calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "cli"), "--method", "rtn",
                 "--scheme", "w3a16", "--group-size", "64", "--quiet"]
    main(main_args)
    info = tlq.verify(ckpt)
    assert info.quant_config["scheme"] == "w3a16" and info.quant_config["group_size"] == 64
    assert tensor_hashes(ckpt) == tensor_hashes(tmp_path / "cli")


def test_verify_raises_on_a_damaged_checkpoint(qwen2_vl_dir, tmp_path):
    ckpt = tlq.calibrate(qwen2_vl_dir, out=tmp_path / "c", method="rtn")
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        tlq.verify(ckpt)


def test_config_or_names_not_both(qwen2_vl_dir, tmp_path):
    cfg = make_config(qwen2_vl_dir, tmp_path / "o", method="rtn")
    with pytest.raises(TypeError, match="either a CalibConfig"):
        tlq.calibrate(cfg, out=tmp_path / "other")
    with pytest.raises(TypeError, match="needs out="):
        tlq.calibrate(qwen2_vl_dir)


def test_make_config_applies_overrides_and_checks_names(tmp_path):
    cfg = make_config(tmp_path, tmp_path / "o", method="gptq", scheme="w4a16", sym=False, exposure="fp",
                      max_tokens=100, seed=3)
    assert (cfg.method.exposure, cfg.scheme.symmetric, cfg.importance.max_tokens, cfg.seed) == ("fp", False, 100, 3)
    with pytest.raises(TLQError, match="unknown method"):
        make_config(tmp_path, tmp_path / "o", method="gtpq")


@pytest.mark.parametrize("method,world,runner", [("gptq", 1, "single"), ("tlq", 1, "single"),
                                                 ("rtn", 1, "data-free"), ("rtn", 2, "multirank"),
                                                 ("tlq", 4, "multirank")])
def test_runner_table(tmp_path, method, world, runner):
    assert choose_runner(make_config(tmp_path, tmp_path / "o", method=method), world).name == runner
    assert [r.name for r in RUNNERS][-1] == "single"  # the catch-all comes last


def test_data_free_method_checks_a_calibration_file_and_says_it_is_unused(qwen2_vl_dir, tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(TLQError, match="bad.jsonl"):
        tlq.calibrate(qwen2_vl_dir, out=tmp_path / "o", method="rtn", calib=bad)
    assert not (tmp_path / "o").exists()
    from tlq.data.calib import bundled_calibration_path
    with caplog.at_level(logging.WARNING, logger="tlq.calibrate"):
        tlq.calibrate(qwen2_vl_dir, out=tmp_path / "o", method="rtn", calib=bundled_calibration_path())
    assert "uses no calibration data" in caplog.text
