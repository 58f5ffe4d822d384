"""`tlq demo` end to end (its own vLLM server: marked slow), and its failure report (a stand-in server)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path

import pytest
from fake_vllm import ENGINE_SERVER

from tlq.errors import TLQError

no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


def test_engine_crash_at_the_first_question_is_named_and_its_log_kept(tmp_path, monkeypatch, fixture_cache):
    """As seen on an AMX machine: the engine dies with SIGILL on the first request, the client gets
    HTTP 500. The demo must end at once with one line naming the signal and the frame, and keep the log."""
    from serve.process import port_in_use
    from tlq.commands.demo import DemoConfig, run_demo
    monkeypatch.setenv("TLQ_CACHE", str(fixture_cache))
    port = next(p for p in range(18470, 18500) if not port_in_use("127.0.0.1", p))
    monkeypatch.setattr("serve.process.vllm_command",
                        lambda cfg: [sys.executable, "-c", ENGINE_SERVER, str(port), "die-on-chat"])
    t0 = time.monotonic()
    with pytest.raises(TLQError) as err:
        run_demo(DemoConfig(workdir=tmp_path, port=port, method="rtn", max_samples=2), echo=lambda *_: None)
    took = time.monotonic() - t0
    msg = str(err.value)
    log = Path(msg.rsplit("; log: ", 1)[1])
    try:
        assert msg.startswith("the demo failed (InternalServerError: ") and took < 120, (msg, took)
        assert "the vLLM server died: EngineCore_DP0 (pid " in msg and "killed by SIGILL; last frame <string>:" in msg
        assert "Fatal Python error: Illegal instruction" in log.read_text()  # the log is kept
        assert not port_in_use("127.0.0.1", port)
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)


@pytest.mark.vllm
@pytest.mark.slow
@no_vllm
def test_demo_runs_every_phase(tmp_path, monkeypatch, fixture_cache):
    from serve.process import port_in_use
    from tlq.commands.demo import DemoConfig, run_demo
    monkeypatch.setenv("TLQ_CACHE", str(fixture_cache))
    port = next(p for p in range(18470, 18500) if not port_in_use("127.0.0.1", p))
    lines = []
    out = run_demo(DemoConfig(workdir=tmp_path, port=port, max_samples=4), echo=lines.append)
    assert list(out["phases"]) == ["fixture", "calibrate", "serve (start-up)", "questions", "bench", "shutdown"]
    assert isinstance(out["text_answer"], str) and isinstance(out["image_answer"], str)
    assert all(lv["errors"] == 0 and lv["completed"] == 8 for lv in out["bench"]["levels"])
    assert lines[-1].startswith("demo finished in")
    assert not port_in_use("127.0.0.1", port)
