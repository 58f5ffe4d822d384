"""Faults under load, through real vLLM (127.0.0.1 only; every wait is bounded).

1. SIGKILL to vLLM's worker process while 8 clients send requests: the clients get errors (none
   hangs), `tlq serve` exits non-zero within seconds with one line naming the worker and SIGKILL,
   no process of the server is left, the port is free, the log is kept, and a new `tlq serve` on
   the same port starts and answers (with --cpu-int4 fast: the start-up line and the plugin's
   kernel summary of both servers must agree with the flag).
2. SIGTERM to `tlq serve` while clients send requests: it stops gracefully (exit 0) within 30 s,
   nothing is left, the port is free.

Two vLLM start-ups in all (about 1.5 min each on 2 vCPUs): the server restarted by the first test
is the one the second test stops; the second starts its own only if the first did not leave one.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

STARTUP_S = 600
CLIENTS = 8
REQUEST_TIMEOUT_S = 60
EXIT_AFTER_KILL_S = 30  # vLLM's watchdog notices in ~5 s, tlq serve's own check stops it after 10 s
GRACEFUL_STOP_S = 30


@dataclass
class Serve:
    """One `tlq serve` subprocess in its own session, and every process seen under it."""

    proc: subprocess.Popen
    port: int
    out: Path
    run_dir: Path
    seen: dict = field(default_factory=dict)

    def record(self) -> None:
        import psutil
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def find(self, *titles: str):
        """The live descendant with the first of `titles` (process titles vLLM sets) that exists."""
        import psutil
        self.record()
        for title in titles:
            for p in self.seen.values():
                try:
                    if p.is_running() and p.cmdline() and p.cmdline()[0].startswith(title):
                        return p
                except psutil.Error:
                    continue
        raise AssertionError(f"none of {titles} under tlq serve: {[p.pid for p in self.seen.values()]}")

    def exit_code(self, timeout: float) -> int:
        """tlq serve's exit code; fails with the ends of its output and of the server log if it runs on."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log = (self.run_dir / "server.log").read_text(errors="replace").splitlines()
            pytest.fail(f"tlq serve still running after {timeout} s\n--- its output:\n"
                        f"{self.out.read_text()[-1500:]}\n--- server log:\n" + "\n".join(log[-60:]))

    def leftovers(self, timeout: float = 15.0) -> list[int]:
        import psutil
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=timeout)
        return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        import psutil
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()


def start_serve(ckpt: Path, port: int, work: Path, name: str, *args: str) -> Serve:
    out = work / f"{name}.out"
    cmd = [sys.executable, "-m", "tlq", "serve", str(ckpt), "--port", str(port), "--max-model-len", "512",
           "--run-dir", str(work / name), *args]
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = Serve(proc, port, out, work / name)
    deadline = time.monotonic() + STARTUP_S
    try:
        while "TLQ server ready" not in out.read_text(errors="replace"):
            assert proc.poll() is None, f"tlq serve exited early:\n{out.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "tlq serve was not ready in time"
            server.record()
            time.sleep(1)
    except BaseException:
        server.kill_all()
        raise
    server.record()
    return server


class Load:
    """CLIENTS threads sending chat requests in a loop until stopped; counts successes and errors."""

    def __init__(self, port: int, model: str):
        from openai import OpenAI
        self.client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0,
                             timeout=REQUEST_TIMEOUT_S)
        self.model = model
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                r = self.client.chat.completions.create(
                    model=self.model, max_tokens=48, temperature=0.0,
                    messages=[{"role": "user", "content": f"client {i} request {n}: tell me a story"}])
                assert r.usage.completion_tokens >= 1
                with self.lock:
                    self.ok += 1
            except Exception as exc:  # noqa: BLE001 - counted: a dead server must give errors
                with self.lock:
                    self.errors.append(type(exc).__name__)
                time.sleep(0.2)

    def wait_for(self, ok: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < ok:
            assert time.monotonic() < deadline, f"only {self.ok} requests succeeded; errors {self.errors[:5]}"
            time.sleep(0.2)

    def finish(self) -> float:
        """Stop sending; returns how long the last requests took to come back (they must not hang)."""
        t0 = time.monotonic()
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self.threads), "a client hung"
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def ckpt(qwen2_vl_dir, tmp_path_factory) -> Path:
    from tlq import calibrate
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme
    return calibrate(CalibConfig(model=qwen2_vl_dir, out=tmp_path_factory.mktemp("faults") / "tiny-rtn",
                                 method=get_method("rtn"), scheme=get_scheme("w4a16")), progress=False)


@pytest.fixture(scope="module")
def servers():
    """Servers started by the tests, by name; whatever is still running at the end is killed."""
    started: dict[str, Serve] = {}
    yield started
    for server in started.values():
        server.kill_all()


def _free_port() -> int:
    from serve.process import port_in_use
    for port in range(18410, 18500):
        if not port_in_use("127.0.0.1", port):
            return port
    pytest.skip("no free port in 18410-18499")


def test_sigkill_to_the_worker_under_load(ckpt, servers, tmp_path_factory):
    from serve.process import port_in_use
    work = tmp_path_factory.mktemp("sigkill")
    port = _free_port()
    first = servers["first"] = start_serve(ckpt, port, work, "first")
    load = Load(port, "tiny-rtn")
    try:
        load.wait_for(ok=CLIENTS)
        worker = first.find("VLLM::Worker", "VLLM::EngineCore")  # the engine runs the model itself at TP 1
        ok_before = load.ok
        t0 = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        rc = first.exit_code(EXIT_AFTER_KILL_S)
        took = time.monotonic() - t0
    finally:
        drain = load.finish()
    print(f"\nSIGKILL to worker pid {worker.pid}: tlq serve exited {rc} after {took:.1f} s; clients: "
          f"{ok_before} ok before, {load.ok - ok_before} ok after, {len(load.errors)} errors; drained in {drain:.1f} s")
    assert rc != 0
    assert load.errors, "no client saw the server die"
    lines = [ln for ln in first.out.read_text().splitlines() if ln.startswith("tlq serve:")]
    assert len(lines) == 1, first.out.read_text()[-3000:]
    assert f"pid {worker.pid}) killed by SIGKILL" in lines[0] and str(first.run_dir / "server.log") in lines[0]
    print(lines[0])
    assert (first.run_dir / "server.log").exists()  # a failed run's log stays
    assert first.leftovers() == []
    assert not port_in_use("127.0.0.1", port)

    # the same port, at once; with --cpu-int4 fast, so the flag's way to the plugin is checked too
    second = servers["second"] = start_serve(ckpt, port, work, "second", "--cpu-int4", "fast")
    check = Load(port, "tiny-rtn")
    try:
        check.wait_for(ok=2)
    finally:
        check.finish()
    _check_numerics(first, fast=False)
    _check_numerics(second, fast=True)


def _check_numerics(server: Serve, fast: bool) -> None:
    """The start-up line of `tlq serve` and the plugin's kernel summary agree with --cpu-int4."""
    from serve.config import cpu_flags
    amx = {"amx_tile", "amx_int8"} <= cpu_flags()
    printed = next(ln for ln in server.out.read_text().splitlines() if ln.startswith("numerics: "))
    summary = next(ln for ln in (server.run_dir / "server.log").read_text().splitlines() if "tlq: serving " in ln)
    print(f"{printed}\n{summary[summary.index('tlq: serving'):]}")
    if not fast:
        assert printed.startswith("numerics: exact W4A16") and "int4 x int8" not in summary
    elif amx:
        assert printed.startswith("numerics: fast int4 x int8") and "W4A8 int4 x int8" in summary
    else:
        assert printed.startswith("numerics: --cpu-int4 fast requested, but") and "W4A8" not in summary


def test_sigterm_to_tlq_serve_under_load_stops_gracefully(ckpt, servers, tmp_path_factory):
    from serve.process import port_in_use
    server = servers.get("second")
    if server is None or server.proc.poll() is not None:
        server = servers["third"] = start_serve(ckpt, _free_port(), tmp_path_factory.mktemp("sigterm"), "third")
    load = Load(server.port, "tiny-rtn")
    try:
        load.wait_for(ok=CLIENTS)
        server.record()
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.exit_code(GRACEFUL_STOP_S)
        took = time.monotonic() - t0
    finally:
        load.finish()
    print(f"\nSIGTERM under load: exit {rc} after {took:.1f} s, {load.ok} ok, {len(load.errors)} errors")
    assert rc == 0
    assert "got SIGTERM: server stopped" in server.out.read_text()
    assert server.leftovers() == []
    assert not port_in_use("127.0.0.1", server.port)
