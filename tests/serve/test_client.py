"""open_target: a server started for `tlq bench` / `tlq eval` says why it failed and keeps its log (stand-in server)."""
from __future__ import annotations

import contextlib
import shutil
import sys
import urllib.error
import urllib.request

import pytest
from fake_vllm import ENGINE_SERVER

from serve.client import open_target
from serve.process import port_in_use


@pytest.mark.parametrize("caller_fails", [True, False])
def test_a_server_that_dies_under_a_caller_is_reported(qwen2_vl_dir, monkeypatch, caller_fails):
    port = next(p for p in range(18440, 18500) if not port_in_use("127.0.0.1", p))
    monkeypatch.setattr("serve.process.vllm_command",
                        lambda cfg: [sys.executable, "-c", ENGINE_SERVER, str(port), "die-on-chat"])
    lines: list[str] = []
    expected = pytest.raises(urllib.error.HTTPError) if caller_fails else contextlib.nullcontext()
    with expected, open_target(str(qwen2_vl_dir), port, echo=lines.append) as endpoint:
        server = endpoint.server
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint.base + "/chat/completions", data=b"{}"),
                                   timeout=30)
        except urllib.error.HTTPError:
            if caller_fails:
                raise
    (said,) = [ln for ln in lines if "vLLM server died" in ln]
    assert said.strip().startswith("the vLLM server died: EngineCore_DP0 (pid ") and "killed by SIGILL" in said
    assert said.endswith(f"log: {server.log_path}") and server.log_path.exists()
    assert not port_in_use("127.0.0.1", port)
    shutil.rmtree(server.run_dir)
