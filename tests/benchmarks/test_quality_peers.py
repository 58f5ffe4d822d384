"""The llm-compressor peer rows of benchmarks/quality.py, without llm-compressor's venv.

lc_run.py itself needs that venv (benchmarks/quality_lib/peers.py runs it as a subprocess); here
a stand-in interpreter checks the protocol, and the parts in the project's venv run for real.
"""
import json
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.quality_lib import grid, peers, report
from tlq.errors import TLQError


def test_peer_rows_follow_our_methods_per_setting():
    assert peers.peers_for(grid.SETTINGS["w3a16"], ["gptq", "awq", "smoothquant", "tlq"]) == ["lc-gptq", "lc-awq"]
    assert peers.peers_for(grid.SETTINGS["w4a8"], ["gptq", "awq", "smoothquant"]) == \
        ["lc-gptq", "lc-awq", "lc-smoothquant"]
    assert peers.peers_for(grid.SETTINGS["w4a8"], ["tlq", "awq"]) == ["lc-awq"]
    assert [peers.our_method(p) for p in peers.PEERS] == ["gptq", "awq", "smoothquant"]
    named = ["lc-gptq-no-actorder", "lc-awq-no-duo"]
    assert peers.peers_for(grid.SETTINGS["w3a16"], ["gptq", "awq"], named) == named
    assert peers.peers_for(grid.SETTINGS["w3a16"], ["awq"], named) == ["lc-awq-no-duo"]


def test_job_carries_the_settings_numerics(tmp_path):
    w3 = peers.job_for(tmp_path, grid.SETTINGS["w3a16"], "lc-awq", tmp_path / "s.pt", tmp_path / "out")
    assert (w3["method"], w3["bits"], w3["group_size"], w3["symmetric"], w3["act_bits"]) == ("awq", 3, 128, False, 16)
    w4 = peers.job_for(tmp_path, grid.SETTINGS["w4a8"], "lc-smoothquant", tmp_path / "s.pt", tmp_path / "out")
    assert (w4["method"], w4["bits"], w4["group_size"], w4["symmetric"], w4["act_bits"]) == \
        ("smoothquant", 4, -1, True, 8)
    assert all(Path(w4[k]).is_absolute() for k in ("model", "out", "samples"))  # the subprocess runs elsewhere
    assert w4["modifier_kwargs"] == {}
    variant = peers.job_for(tmp_path, grid.SETTINGS["w4a8"], "lc-gptq-no-actorder", tmp_path / "s.pt", tmp_path)
    assert (variant["method"], variant["modifier_kwargs"]) == ("gptq", {"actorder": None})


def test_samples_are_what_the_calibrator_encodes(qwen2_vl_dir, bundled_calib, tmp_path):
    from transformers import AutoProcessor

    from tlq.data.calib import load_calibration
    from tlq.data.processing import encode_sample
    path = peers.write_samples(qwen2_vl_dir, bundled_calib, tmp_path / "samples.pt")
    written = torch.load(path)
    processor = AutoProcessor.from_pretrained(qwen2_vl_dir)
    expected = [encode_sample(processor, s) for s in load_calibration(bundled_calib)]
    assert len(written) == len(expected)
    assert any("pixel_values" in w for w in written)
    for got, want in zip(written, expected):
        assert "labels" not in got and set(got) == set(want) - {"labels"}
        for key in got:
            assert torch.equal(got[key], want[key]), key


def _stand_in(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_subprocess_protocol_result_and_failure(tmp_path):
    job = {"method": "gptq", "out": str(tmp_path / "peer-out")}
    ok = _stand_in(tmp_path, 'echo "progress"; echo \'RESULT {"oneshot_s": 1.5}\'; echo "OMP=$OMP_NUM_THREADS" >&2')
    assert peers.quantize_with_peer(ok, job, tmp_path) == {"oneshot_s": 1.5}
    assert json.loads((tmp_path / "peer-out.job.json").read_text()) == job
    bad = _stand_in(tmp_path, 'echo "Traceback: lc broke" >&2; exit 3')
    with pytest.raises(TLQError, match="exit code 3(.|\n)*lc broke"):
        peers.quantize_with_peer(bad, job, tmp_path)
    silent = _stand_in(tmp_path, "exit 0")
    with pytest.raises(TLQError, match="exit code 0"):
        peers.quantize_with_peer(silent, job, tmp_path)


def test_check_python_names_the_fix(tmp_path):
    with pytest.raises(TLQError, match="does not exist.*setup_lc_venv.sh"):
        peers.check_python(tmp_path / "missing" / "python")
    fake = _stand_in(tmp_path, "echo 'No module named llmcompressor' >&2; exit 1")
    with pytest.raises(TLQError, match="cannot import llmcompressor"):
        peers.check_python(fake)


@pytest.mark.parametrize("setting,hooked", [("w3a16", False), ("w4a8", True)])
def test_peer_model_gets_our_activation_quantization(qwen2_vl_dir, setting, hooked):
    from tlq.adapters import adapter_for_model_type
    model = peers.load_peer(qwen2_vl_dir, grid.SETTINGS[setting])
    assert next(model.parameters()).dtype == torch.float32
    adapter = adapter_for_model_type(model.config.model_type)
    linears = [layer.get_submodule(n) for layer in adapter.layers(model) for n in adapter.linear_names()]
    assert all(bool(m._forward_pre_hooks) == hooked for m in linears)


def _entry(kl: float, avg: float = 50.0) -> dict:
    return {"kl": [kl, 0.0], "avg": [avg, 0.0], "seeds": 1}


def test_peer_verdicts_and_table():
    table = {"m": {"W4A8": {"gptq": _entry(1.1e-3), "lc-gptq": _entry(1.0e-3), "awq": _entry(0.5e-3),
                            "lc-awq": _entry(1.0e-3), "smoothquant": _entry(3.0e-3), "lc-smoothquant": _entry(2.0e-3),
                            "tlq": _entry(0.1e-3), "lc-gptq-no-actorder": _entry(2.2e-3)},
                   "W3A16 g128": {"lc-gptq": _entry(1e-3)}}}  # no row of ours: no comparison
    rows = report.peer_rows(table)
    assert [(r["method"], r["verdict"]) for r in rows] == \
        [("gptq", "within"), ("awq", "ours better"), ("smoothquant", "peer better"), ("gptq", "ours better")]
    assert rows[-1]["peer"] == "lc-gptq-no-actorder" and rows[-1]["kl_ratio"] == pytest.approx(0.5)
    assert rows[0]["kl_ratio"] == pytest.approx(1.1)
    assert [r["verdict"] for r in report.peer_rows({"m": {"s": {"gptq": _entry(0.84e-3), "lc-gptq": _entry(1e-3)}}})] \
        == ["ours better"]
    md = report.markdown({}, [], [], {"calib_samples": 1, "pool_size": 1, "seeds": [0], "test_size": 1,
                                      "test_image": 1, "test_text": 0}, rows)
    assert "## Our baselines against llm-compressor" in md
    assert "| m | W4A8 | SmoothQuant | llm-compressor SmoothQuant | 3.00 | 2.00 | 1.50 | peer better |" in md
