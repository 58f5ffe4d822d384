"""`tlq demo` end to end (its own vLLM server: marked slow)."""
from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]


def test_demo_runs_every_phase(tmp_path, monkeypatch, fixture_cache):
    from tlq.commands.demo import DemoConfig, run_demo
    from serve.process import port_in_use
    monkeypatch.setenv("TLQ_CACHE", str(fixture_cache))
    port = next(p for p in range(18470, 18500) if not port_in_use("127.0.0.1", p))
    lines = []
    out = run_demo(DemoConfig(workdir=tmp_path, port=port, max_samples=4), echo=lines.append)
    assert list(out["phases"]) == ["fixture", "calibrate", "serve (start-up)", "questions", "bench", "shutdown"]
    assert isinstance(out["text_answer"], str) and isinstance(out["image_answer"], str)
    assert all(lv["errors"] == 0 and lv["completed"] == 8 for lv in out["bench"]["levels"])
    assert lines[-1].startswith("demo finished in")
    assert not port_in_use("127.0.0.1", port)
