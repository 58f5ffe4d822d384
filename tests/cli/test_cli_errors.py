"""Bad input: a one-line error naming the problem and the fix, exit code 2, nothing written."""
import json
import shutil

import pytest

from tlq.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.err.strip()


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def _assert_one_line_error(code, err, *phrases):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_missing_model_path(tmp_path, out, capsys):
    code, err = run_cli(["calibrate", str(tmp_path / "nope"), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "does not exist", "local folder")
    assert not out.exists()


def test_folder_without_model(tmp_path, out, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["calibrate", str(tmp_path / "empty"), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "holds no model", "config.json")
    assert not out.exists()


def test_unsupported_architecture(qwen2_vl_dir, tmp_path, out, capsys):
    fake = tmp_path / "llama"
    shutil.copytree(qwen2_vl_dir, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["model_type"] = "llama"
    (fake / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(["calibrate", str(fake), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "unsupported architecture 'llama'", "qwen2_vl")
    assert not out.exists()


@pytest.mark.parametrize("flag,value,phrase", [("--scheme", "w5a5", "unknown scheme 'w5a5'"),
                                               ("--method", "magic", "unknown method 'magic'")])
def test_unknown_scheme_or_method(qwen2_vl_dir, out, capsys, flag, value, phrase):
    code, err = run_cli(["calibrate", str(qwen2_vl_dir), "--out", str(out), flag, value], capsys)
    _assert_one_line_error(code, err, phrase, "choose one of")
    assert not out.exists()


@pytest.mark.parametrize("flag,value,phrase", [("--damp", "0", "damp must be positive"),
                                               ("--exposure-strength", "1.5", "outside [0, 1]"),
                                               ("--input-scaling", "magic", "unknown input scaling 'magic'"),
                                               ("--damp-candidates", "0.01,x", "numbers separated by commas"),
                                               ("--damp-candidates", "0.01,-1", "must be positive")])
def test_solver_settings_out_of_range(qwen2_vl_dir, out, capsys, flag, value, phrase):
    code, err = run_cli(["calibrate", str(qwen2_vl_dir), "--out", str(out), flag, value], capsys)
    _assert_one_line_error(code, err, phrase)
    assert not out.exists()


def test_group_size_must_divide(qwen2_vl_dir, out, capsys):
    code, err = run_cli(["calibrate", str(qwen2_vl_dir), "--out", str(out), "--method", "rtn",
                         "--group-size", "96"], capsys)
    _assert_one_line_error(code, err, "group size 96 does not divide", "--group-size")
    assert not out.exists()


def test_existing_output_needs_overwrite(qwen2_vl_dir, out, capsys):
    out.mkdir()
    code, err = run_cli(["calibrate", str(qwen2_vl_dir), "--out", str(out), "--method", "rtn"], capsys)
    _assert_one_line_error(code, err, "already exists", "--overwrite")
    assert list(out.iterdir()) == []
    assert main_ok(["calibrate", str(qwen2_vl_dir), "--out", str(out), "--method", "rtn", "--overwrite"])
    assert (out / "tlq_manifest.json").is_file()


def main_ok(args):
    try:
        main(args)
    except SystemExit as exc:
        return exc.code in (0, None)
    return True


@pytest.mark.parametrize("content,phrase", [("", "empty"), ("{not json\n", "line 1")])
def test_empty_or_malformed_calibration_file(qwen2_vl_dir, tmp_path, out, capsys, content, phrase):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    code, err = run_cli(["calibrate", str(qwen2_vl_dir), "--out", str(out), "--calib", str(calib)], capsys)
    _assert_one_line_error(code, err, phrase)
    assert not out.exists()


def test_verify_prints_verdicts(qwen2_vl_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main_ok(["calibrate", str(qwen2_vl_dir), "--out", str(ck), "--method", "rtn", "--quiet"])
    capsys.readouterr()
    assert main_ok(["verify", str(ck)])
    assert capsys.readouterr().out.startswith("OK ")
    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(ck)])
    assert exc.value.code == 1 and capsys.readouterr().out.startswith("FAIL ")
