"""Foreground `tlq serve` without vLLM: CLI parsing, the banner, SIGTERM forwarding to a stand-in server."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fake_vllm import ENGINE_SERVER

from serve.config import ServeConfig

FAKE_SERVER = textwrap.dedent("""
    import http.server, signal, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    def bye(sig, _):
        print("fake server got", signal.Signals(sig).name, flush=True)
        child.terminate()
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import serve.process as sp
    from serve.config import ServeConfig
    from serve.launcher import serve_forever
    sp.ENGINE_EXIT_GRACE_S = 2.0
    port = int(sys.argv[2])
    sp.vllm_command = lambda cfg: [sys.executable, "-c", sys.argv[3], str(port)]
    sys.exit(serve_forever(ServeConfig(model=Path(sys.argv[1]), port=port, run_dir=Path(sys.argv[4]),
                                       verify=False, device="cpu")))
""")


@contextlib.contextmanager
def foreground_serve(model, tmp_path, server_script: str):
    """`serve_forever` (RUNNER) in its own session over a stand-in server; yields once it printed its banner.

    Yields (runner, port, out, err): the runner Popen and the files holding its stdout and stderr.
    """
    from serve.process import port_in_use
    port = next(p for p in range(18440, 18500) if not port_in_use("127.0.0.1", p))
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as f, open(err, "wb") as e:
        runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(model), str(port), server_script,
                                   str(tmp_path / "run")], stdout=f, stderr=e, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "TLQ server ready" not in out.read_text():
            assert runner.poll() is None and time.monotonic() < deadline, out.read_text() + err.read_text()
            time.sleep(0.2)
        yield runner, port, out, err
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


def test_cli_passes_options_through(qwen2_vl_dir, monkeypatch):
    from typer.testing import CliRunner

    from tlq.cli import app
    seen = {}
    monkeypatch.setattr("serve.launcher.serve_forever", lambda cfg, echo: seen.setdefault("cfg", cfg) and 0)
    res = CliRunner().invoke(app, ["serve", str(qwen2_vl_dir), "--port", "18431", "--tp", "2",
                                   "--vllm-arg=--max-num-batched-tokens=4096", "--max-num-seqs", "8"],
                             env={"TLQ_API_KEY": "k1"})
    assert res.exit_code == 0, res.output
    cfg = seen.pop("cfg")
    assert (cfg.port, cfg.tp, cfg.api_key, cfg.max_num_seqs, cfg.host) == (18431, 2, "k1", 8, "127.0.0.1")
    assert cfg.extra_args == ["--max-num-batched-tokens=4096"] and cfg.cpu_int4 == "exact"
    res = CliRunner().invoke(app, ["serve", str(qwen2_vl_dir), "--cpu-int4", "fast"])
    assert res.exit_code == 0 and seen.pop("cfg").cpu_int4 == "fast", res.output
    res = CliRunner().invoke(app, ["serve", str(qwen2_vl_dir), "--cpu-int4", "int2"])
    assert res.exit_code == 2 and "cfg" not in seen


def test_help_documents_cpu_int4():
    from typer.testing import CliRunner

    from tlq.cli import app
    text = " ".join(CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "--cpu-int4" in text and "[default: exact]" in text and "int4 x int8" in text and "AMX" in text


def test_banner_without_and_with_a_key(qwen2_vl_dir):
    from types import SimpleNamespace

    from serve.config import model_defaults, resolve
    from serve.launcher import ready_banner
    for key in (None, "k"):
        cfg = resolve(ServeConfig(model=qwen2_vl_dir, port=18432, api_key=key, device="cpu"),
                      model_defaults(qwen2_vl_dir))
        fake = SimpleNamespace(cfg=cfg, url="http://127.0.0.1:18432/v1", ready_after=1.0, log_path="x.log")
        text = ready_banner(fake)
        assert "curl http://127.0.0.1:18432/v1/chat/completions" in text
        assert ("Bearer $TLQ_API_KEY" in text) == (key is not None)
        assert ('os.environ["TLQ_API_KEY"]' in text) == (key is not None)
        assert key is None or "'k'" not in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_nothing_is_left(qwen2_vl_dir, tmp_path, sig):
    import psutil
    with foreground_serve(qwen2_vl_dir, tmp_path, FAKE_SERVER) as (runner, _port, out, err):
        kids = psutil.Process(runner.pid).children(recursive=True)
        assert len(kids) >= 2  # the stand-in server and its own child
        runner.send_signal(sig)
        assert runner.wait(30) == 0, out.read_text() + err.read_text()
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        text = out.read_text()
        assert f"got {sig.name}: server stopped" in text
        assert "numerics: exact W4A16 on CPU" in text
        assert f"fake server got {sig.name}" in (tmp_path / "run" / "server.log").read_text()


def test_engine_death_ends_tlq_serve_with_one_line_and_keeps_the_log(qwen2_vl_dir, tmp_path):
    """SIGILL to the engine of a stand-in server that stays up: non-zero exit within seconds, one
    line naming the process, the signal and its last frame; nothing left running; the log kept."""
    import psutil

    from serve.process import port_in_use
    (tmp_path / "run").mkdir()  # a reused --run-dir: an earlier run's crash in the log is not this one's
    (tmp_path / "run" / "server.log").write_text("[tlq] vLLM process exited: Old_0 pid 1 killed by SIGSEGV\n"
                                                 "Fatal Python error: Segmentation fault\n")
    with foreground_serve(qwen2_vl_dir, tmp_path, ENGINE_SERVER) as (runner, port, _out, err):
        kids = psutil.Process(runner.pid).children(recursive=True)
        (server,) = [k for k in kids if k.ppid() == runner.pid]
        (engine,) = server.children()
        t0 = time.monotonic()
        os.kill(engine.pid, signal.SIGILL)
        rc = runner.wait(30)
        took = time.monotonic() - t0
        assert rc != 0 and took < 15, (rc, took)
        lines = [ln for ln in err.read_text().splitlines() if ln.startswith("tlq serve:")]
        assert len(lines) == 1, err.read_text()
        assert lines[0].startswith(f"tlq serve: the vLLM server died: EngineCore_DP0 (pid {engine.pid}) killed by "
                                   "SIGILL; last frame <string>:")
        assert " in engine_loop; " in lines[0] and lines[0].endswith(str(tmp_path / "run" / "server.log"))
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert "Fatal Python error: Illegal instruction" in (tmp_path / "run" / "server.log").read_text()
        assert not port_in_use("127.0.0.1", port)


@pytest.mark.parametrize("ending", ["clean", "engine dies", "caller failed"])
def test_run_folder_is_removed_only_after_a_clean_run(qwen2_vl_dir, monkeypatch, ending):
    import psutil

    from serve.process import ServerProcess, port_in_use
    port = next(p for p in range(18440, 18500) if not port_in_use("127.0.0.1", p))
    monkeypatch.setattr("serve.process.vllm_command", lambda cfg: [sys.executable, "-c", ENGINE_SERVER, str(port)])
    server = ServerProcess(ServeConfig(model=qwen2_vl_dir, port=port, verify=False, device="cpu"))
    try:
        server.start()
        server.wait_ready(timeout=60)
        assert not server.failed() and server.dead_processes() == []
        server.keep_log = ending == "caller failed"  # e.g. tlq bench after request errors
        if ending == "engine dies":
            (engine,) = psutil.Process(server.pid).children()
            engine.kill()
            engine.wait(10)
            assert server.failed() and server.dead_processes() == [f"python (pid {engine.pid})"]
            deadline = time.monotonic() + 10  # the stand-in reaps it in a thread: wait for its report
            while "killed by SIGKILL" not in server.log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.failure_reason().startswith(f"EngineCore_DP0 (pid {engine.pid}) killed by SIGKILL")
    finally:
        server.stop(grace=5.0)
    assert server.log_path.exists() == (ending != "clean")
    if ending != "clean":
        shutil.rmtree(server.run_dir)


def test_api_server_killed_is_named(qwen2_vl_dir, tmp_path):
    """The OOM killer takes the API server itself: tlq serve says so in its one line and exits non-zero."""
    import psutil
    with foreground_serve(qwen2_vl_dir, tmp_path, ENGINE_SERVER) as (runner, _port, _out, err):
        (server,) = psutil.Process(runner.pid).children()
        server.kill()
        assert runner.wait(30) == 1
        (line,) = [ln for ln in err.read_text().splitlines() if ln.startswith("tlq serve:")]
        assert line.startswith(f"tlq serve: the vLLM server died: the API server (pid {server.pid}) was killed by "
                               "SIGKILL; log: "), line


def test_stop_does_not_wait_out_the_grace_once_the_engine_is_gone(qwen2_vl_dir, monkeypatch):
    """vLLM stopped its engine but its HTTP server hangs on a connection: stop() ends it after HTTP_DRAIN_S."""
    from serve.process import HTTP_DRAIN_S, ServerProcess, port_in_use
    port = next(p for p in range(18440, 18500) if not port_in_use("127.0.0.1", p))
    monkeypatch.setattr("serve.process.vllm_command",
                        lambda cfg: [sys.executable, "-c", ENGINE_SERVER, str(port), "hang-on-stop"])
    server = ServerProcess(ServeConfig(model=qwen2_vl_dir, port=port, verify=False, device="cpu"))
    try:
        server.start()
        server.wait_ready(timeout=60)
        t0 = time.monotonic()
        rc = server.stop(signal.SIGTERM, grace=60.0)
        took = time.monotonic() - t0
    finally:
        server.stop(grace=1.0)
    assert rc == -signal.SIGKILL and HTTP_DRAIN_S <= took < HTTP_DRAIN_S + 10, (rc, took)
    assert not port_in_use("127.0.0.1", port)


def test_a_crash_before_ready_is_named(qwen2_vl_dir, monkeypatch, tmp_path):
    from serve.process import ServerDied, ServerProcess
    crash = "import os, signal\ndef load_weights():\n    os.kill(os.getpid(), signal.SIGSEGV)\nload_weights()\n"
    monkeypatch.setattr("serve.process.vllm_command", lambda cfg: [sys.executable, "-c", crash])
    server = ServerProcess(ServeConfig(model=qwen2_vl_dir, port=18496, verify=False, device="cpu", run_dir=tmp_path))
    server.start()
    with pytest.raises(ServerDied) as err:
        server.wait_ready(timeout=60)
    assert str(err.value) == ("the vLLM server stopped before it was ready: a vLLM process died of SIGSEGV; last frame "
                              f"<string>:3 in load_weights; API server killed by SIGSEGV; log: {tmp_path / 'server.log'}")
    server.stop()
    assert (tmp_path / "server.log").exists()
