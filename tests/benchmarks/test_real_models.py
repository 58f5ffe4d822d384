"""benchmarks/real_models.py: results parsing and the table without a server; real lmms-eval end to end.

The end-to-end test runs `python -m benchmarks.real_models` with the real lmms-eval package (the
`eval` extra) for the FP cell of the tiny Qwen2-VL on 20 questions of the bundled set, as the local
task: a real vLLM server (30-90 s to start on a CPU), lmms-eval's `openai_compatible` model against
it, and `tlq eval` on the same server and questions, whose accuracy and answers must be lmms-eval's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository root holds `benchmarks`

from benchmarks import real_models as rm
from tlq.errors import TLQError

STARTUP_S = 600

def _write_results(path: Path, results: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}))
    return path


# -- fast: no server ----------------------------------------------------------------------------------
def test_parse_results_nested_file_skips_stderr_and_alias(tmp_path):
    old = _write_results(tmp_path / "tlq-eval" / "2024-01-01T00-00-00_results.json",
                         {"ocrbench": {"alias": "ocrbench", "ocrbench_accuracy,none": 0.1}})
    os.utime(old, (time.time() - 100, time.time() - 100))
    new = _write_results(tmp_path / "tlq-eval" / "deeper" / "2024-01-02T00-00-00_results.json", {
        "ocrbench": {"alias": "ocrbench", "ocrbench_accuracy_stderr,none": 0.01, "ocrbench_accuracy,none": 0.42},
        "mmmu_val": {"alias": "mmmu_val", "flag": True, "mmmu_acc,none": 0.35, "submission,none": 7}})
    (tmp_path / "tlq-eval" / "2024-01-02T00-00-00_samples_ocrbench.jsonl").write_text("{}\n")
    found = rm.newest_results_file(tmp_path)
    assert found == new
    got = rm.parse_results(found, ["ocrbench", "mmmu_val"])
    assert got == {"ocrbench": {"metric": "ocrbench_accuracy,none", "value": 0.42},
                   "mmmu_val": {"metric": "mmmu_acc,none", "value": 0.35}}
    # files older than this run's start are not this run's results
    with pytest.raises(TLQError, match="no \\*_results.json"):
        rm.newest_results_file(tmp_path, since=time.time() + 60)


def test_parse_results_metric_override_and_groups(tmp_path):
    path = _write_results(tmp_path / "m" / "x_results.json",
                          {"scienceqa_img": {"alias": "s", "exact_match,none": 0.7, "relaxed,none": 0.8}})
    data = json.loads(path.read_text())
    data["groups"] = {"mme": {"alias": "mme", "mme_cognition_score,none": 300.0, "mme_percetion_score,none": 1400.0}}
    path.write_text(json.dumps(data))
    assert rm.parse_results(path, ["scienceqa_img"], {"scienceqa_img": "relaxed"})["scienceqa_img"]["value"] == 0.8
    assert rm.parse_results(path, ["scienceqa_img"], {"scienceqa_img": "relaxed,none"})["scienceqa_img"]["value"] == 0.8
    got = rm.parse_results(path, ["mme"], {"mme": "mme_percetion_score"})
    assert got["mme"] == {"metric": "mme_percetion_score,none", "value": 1400.0}
    with pytest.raises(TLQError, match="no metric 'bleu'"):
        rm.parse_results(path, ["scienceqa_img"], {"scienceqa_img": "bleu"})
    with pytest.raises(TLQError, match="no results for task 'ocrbench'"):
        rm.parse_results(path, ["ocrbench"])


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"results": {"t": {"alias": "t", "x": "N/A"}}}'])
def test_garbled_or_missing_results_are_tlq_errors(tmp_path, text):
    with pytest.raises(TLQError, match="no \\*_results.json"):
        rm.newest_results_file(tmp_path / "nothing-here")
    path = tmp_path / "x_results.json"
    path.write_text(text)
    with pytest.raises(TLQError):
        rm.parse_results(path, ["t"])


def test_missing_lmms_eval_fails_before_any_work(qwen2_vl_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(rm, "find_spec", lambda name: None)
    out = tmp_path / "out"
    with pytest.raises(TLQError, match="eval extra"):
        rm.main(["--model", str(qwen2_vl_dir), "--methods", "rtn", "--schemes", "w4a16", "--out", str(out)])
    assert not (out / "ckpt").exists() and not (out / "results.jsonl").exists()


def test_bad_arguments_are_tlq_errors(tmp_path):
    with pytest.raises(TLQError, match="not a model folder"):
        rm.parse_args(["--model", str(tmp_path)])
    with pytest.raises(TLQError, match="task=metric_key"):
        rm._metric_overrides(["ocrbench"])
    with pytest.raises(TLQError, match="unknown scheme"):
        rm.parse_args(["--model", str(tmp_path), "--schemes", "w5a5"])


def test_plan_fp_once_and_smoothquant_only_with_activation_quantization():
    cells = rm.plan_cells(["fp", "rtn", "smoothquant", "tlq"], ["w3a16", "w4a8"])
    assert [c.name for c in cells] == ["fp", "rtn-w3a16", "tlq-w3a16", "rtn-w4a8", "smoothquant-w4a8", "tlq-w4a8"]
    assert [c.name for c in rm.plan_cells(["rtn"], ["w4a16"])] == ["rtn-w4a16"]


def test_table_layout_fp_first_percent_and_average():
    def rec(method, scheme, a, b):
        return {"method": method, "scheme": scheme, "metrics": {"mmmu_val": {"metric": "mmmu_acc,none", "value": a},
                                                                "ocrbench": {"metric": "ocr,none", "value": b}}}
    records = [rec("tlq", "w4a8", 0.40, 0.60), rec("fp", None, 0.50, 0.70), rec("rtn", "w4a8", 0.30, 0.50)]
    md = rm.render_table(records, ["w4a8", "w3a16"], ["fp", "rtn", "awq", "tlq"], ["mmmu_val", "ocrbench"])
    blocks = md.split("## ")[1:]
    assert len(blocks) == 2 and blocks[0].startswith("w4a8") and blocks[1].startswith("w3a16")
    rows = [ln for ln in blocks[0].splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows == ["| Method | MMMU | OCRBench | Avg |", "| FP | 50.0 | 70.0 | 60.0 |", "| RTN | 30.0 | 50.0 | 40.0 |",
                    "| AWQ | - | - | - |", "| TLQ | 40.0 | 60.0 | 50.0 |"]
    assert "| FP | 50.0 | 70.0 | 60.0 |" in blocks[1] and "| RTN | - | - | - |" in blocks[1]
    assert "mmmu_val: mmmu_acc,none" in md


def test_lmms_eval_failure_is_a_tlq_error_and_the_server_is_stopped(tmp_path, monkeypatch, lmms_eval_installed):
    """run_cell with a fake server: real lmms-eval rejects a bad argument, the server is stopped all the same."""
    import serve.process

    events = []

    class FakeServer:
        url = "http://127.0.0.1:9/v1"

        def __init__(self, cfg):
            events.append(("init", cfg.served_model_name, bool(cfg.api_key)))

        def start(self):
            events.append("start")

        def wait_ready(self):
            return 0.5

        def stop(self):
            events.append("stop")

    monkeypatch.setattr(serve.process, "ServerProcess", FakeServer)
    args = Namespace(model=tmp_path, out=tmp_path / "out", port=18799, tp=1, max_model_len=None,
                     images_per_prompt=None, startup_timeout=5, limit=3, lmms_args="--no_such_flag", metric={},
                     task_dir=None, data=None, tlq_eval_check="fp", concurrency=1)
    key = {"model": str(tmp_path), "method": "fp", "scheme": None, "tasks": ["ocrbench"], "limit": 3}
    with pytest.raises(TLQError, match="lmms-eval exited with code .*full log"):
        rm.run_cell(rm.Cell("fp", None), args, key)
    assert events == [("init", rm.SERVED_NAME, True), "start", "stop"]
    cmd = rm.lmms_command(["a", "b"], tmp_path, 3.0, ["--verbosity", "DEBUG"], include_path=tmp_path / "t")
    assert cmd[1:] == ["-m", "lmms_eval", "--model", "openai_compatible", "--model_args",
                       f"model_version={rm.SERVED_NAME},num_concurrent=1", "--tasks", "a,b", "--batch_size", "1",
                       "--output_path", str(tmp_path), "--include_path", str(tmp_path / "t"), "--log_samples",
                       "--limit", "3", "--verbosity", "DEBUG"]


def test_table_states_the_tlq_eval_check():
    rec = {"method": "fp", "scheme": None, "metrics": {rm.LOCAL_TASK: {"metric": "exact_match,none", "value": 0.65}},
           "tlq_eval": {"n": 20, "accuracy": 0.65, "same_answers": 20}}
    md = rm.render_table([rec], ["w4a16"], ["fp"], [rm.LOCAL_TASK], "tiny")
    assert "| FP | 65.0 | 65.0 |" in md and md.startswith("# tiny")
    assert "Check, fp: lmms-eval 65.0 %, `tlq eval` 65.0 % on the same 20 questions; 20/20 answers identical." in md


# -- end to end: one real vLLM server -------------------------------------------------------------
def _free_port() -> int:
    from serve.process import port_in_use
    for port in range(18700, 18799):
        if not port_in_use("127.0.0.1", port):
            return port
    pytest.skip("no free port in 18700-18798")


def _server_processes(port: int) -> list[int]:
    import psutil
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve.entry" in cmd and str(port) in cmd:
            found.append(p.info["pid"])
    return found


@pytest.mark.vllm
@pytest.mark.skipif(find_spec("vllm") is None, reason="vllm is not installed")
def test_real_lmms_eval_end_to_end_matches_tlq_eval_then_resume(qwen2_vl_dir, bundled_calib, tmp_path, monkeypatch,
                                                                 lmms_eval_installed):
    """FP cell, 20 questions of the bundled set (images, a system turn, earlier turns, text-first parts)."""
    from serve.process import port_in_use
    out, port = tmp_path / "out", _free_port()
    argv = ["--model", str(qwen2_vl_dir), "--data", str(bundled_calib), "--methods", "fp", "--limit", "20",
            "--out", str(out), "--port", str(port), "--max-model-len", "1024", "--startup-timeout", str(STARTUP_S)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_models", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=STARTUP_S + 600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not _server_processes(port) and not port_in_use("127.0.0.1", port)

    (rec,) = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert (rec["method"], rec["scheme"], rec["tasks"], rec["limit"]) == ("fp", None, [rm.LOCAL_TASK], 20.0)
    lmms_acc = rec["metrics"][rm.LOCAL_TASK]["value"]
    assert rec["metrics"][rm.LOCAL_TASK]["metric"] == "exact_match,none"
    check = rec["tlq_eval"]
    assert check["n"] == 20 and check["same_answers"] == 20, check  # every answer as tlq eval got it
    assert check["accuracy"] == lmms_acc
    answers = rm.lmms_answers(out / "lmms" / "fp", rm.LOCAL_TASK)
    assert len(answers) == 20 and all(answers)  # real generations, not failed requests
    assert not any("LMMS_EVAL_REQUEST_FAILED" in a for a in answers)
    assert "| Method | local QA (EM) | Avg |" in proc.stdout
    assert f"| FP | {100 * lmms_acc:.1f} | {100 * lmms_acc:.1f} |" in proc.stdout
    assert "20/20 answers identical" in proc.stdout
    md = (out / "real_models.md").read_text()
    assert md in proc.stdout

    # a rerun skips the finished cell: no lmms-eval run, no calibration, no server
    import serve.process

    def refuse(*_a, **_k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(serve.process, "ServerProcess", refuse)
    monkeypatch.setattr(rm, "ensure_checkpoint", refuse)
    t0 = time.monotonic()
    (again,) = rm.main(argv)
    assert time.monotonic() - t0 < 60
    assert again == rec and (out / "real_models.md").read_text() == md


def test_servable_copy_nests_siglip_keys_only_when_needed(tmp_path):
    """The trained LLaVA-OV fixture (saved by transformers 5) gets vLLM's `vision_tower.vision_model.` layout."""
    import torch
    from safetensors.torch import load_file, save_file
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    for folder, key in ((flat, "vision_tower.embeddings.patch_embedding.weight"),
                        (nested, "vision_tower.vision_model.embeddings.patch_embedding.weight")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        save_file({key: torch.ones(2), "model.language_model.norm.weight": torch.zeros(2)},
                  str(folder / "model.safetensors"))
    assert rm.servable_copy(nested, tmp_path / "unused") == nested and not (tmp_path / "unused").exists()
    copy = rm.servable_copy(flat, tmp_path / "copy")
    assert copy == tmp_path / "copy" and (copy / "config.json").is_file()
    assert set(load_file(copy / "model.safetensors")) == {
        "vision_tower.vision_model.embeddings.patch_embedding.weight", "model.language_model.norm.weight"}
    assert "vision_tower.embeddings.patch_embedding.weight" in load_file(flat / "model.safetensors")  # untouched
    assert rm.servable_copy(flat, tmp_path / "copy") == copy  # made once
