"""`tlq calibrate --tp N`: a warning at calibration time when a TP split would cut quantization groups."""
from tlq.cli import main


def run(args, capsys):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    return capsys.readouterr().err


def test_tp_warning_names_layer_and_offers_group_size(fixture_cache, tmp_path, capsys):
    from tlq.fixtures import ensure_fixture
    src = ensure_fixture("qwen2-vl", fixture_cache, seed=0, size="tiny-tp-odd")  # down_proj K = 640
    base = ["calibrate", str(src), "--method", "rtn", "--scheme", "w4a16", "--dry-run"]
    err = run(base + ["--out", str(tmp_path / "a"), "--tp", "2"], capsys)
    assert "warning:" in err and "down_proj (640 inputs -> 320 per rank)" in err, err
    assert "--group-size 64 splits every layer into whole groups at TP=2" in err
    assert "o_proj" not in err  # 256 / 2 = 128: whole groups
    assert "warning:" not in run(base + ["--out", str(tmp_path / "b"), "--tp", "2", "--group-size", "64"], capsys)
    assert "warning:" not in run(base + ["--out", str(tmp_path / "c"), "--tp", "1"], capsys)
