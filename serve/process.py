"""The vLLM server as a child process we own: start, wait for /health, stop without orphans.

The child gets its own session (process group id == its pid), so stopping can reach the
engine and worker processes vLLM forks, and nothing else: the signal goes to the API server
first (it shuts its engine down), and after a grace period the whole group gets SIGKILL;
descendants recorded while it ran are checked too, in case one left the group. On Linux the
child also receives SIGTERM if this process dies without stopping it (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from serve.config import ServeConfig, check_tensor_parallel, model_defaults, resolve, vllm_command, vllm_env
from tlq.errors import TLQError

log = logging.getLogger("tlq.serve")

STOP_GRACE_S = 30.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as uvicorn does: connections in TIME_WAIT from earlier clients do not block a new server
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _alive(proc) -> bool:
    """True while `proc` (a psutil.Process) runs; a reused pid or a zombie counts as gone."""
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ServerProcess:
    """One vLLM OpenAI-compatible server for a checkpoint; use as a context manager.

    `ServerProcess(cfg)` verifies the checkpoint and resolves defaults (no process yet);
    `start()` launches it, `wait_ready()` blocks until /health answers, `stop()` ends it.
    """

    def __init__(self, cfg: ServeConfig):
        self.defaults = model_defaults(cfg.model, verify=cfg.verify)
        check_tensor_parallel(self.defaults, cfg.tp)
        self.cfg = resolve(cfg, self.defaults)
        self.proc: subprocess.Popen | None = None
        self._own_run_dir = cfg.run_dir is None
        self.run_dir: Path | None = Path(cfg.run_dir) if cfg.run_dir else None
        self._descendants: dict = {}  # pid -> psutil.Process (remembers its start time)
        self._force = False
        self.started_at = 0.0
        self.ready_after: float | None = None

    # -- properties -------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1."""
        return self.cfg.base_url + "/v1"

    @property
    def model_name(self) -> str:
        return self.cfg.served_model_name

    @property
    def log_path(self) -> Path:
        return self.run_dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        if port_in_use(self.cfg.host, self.cfg.port):
            raise TLQError(f"port {self.cfg.port} on {self.cfg.host} is already in use; pass another --port "
                           "or stop the server that holds it")
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="tlq-serve-"))
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        cmd = vllm_command(self.cfg)
        log.info("starting: %s", " ".join(cmd))
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=vllm_env(self.cfg, self.run_dir), start_new_session=True,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only, no locks taken

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.cfg.base_url + "/health", timeout=timeout) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001 - refused, reset, timeout: not ready yet
            return False

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until /health answers 200; returns the start-up time in seconds."""
        deadline = self.started_at + (timeout or self.cfg.startup_timeout)
        while True:
            self._record_descendants()
            rc = self.proc.poll()
            if rc is not None:
                raise TLQError(f"the vLLM server exited with code {rc} before it was ready: "
                               f"{self.last_error()}; full log: {self.log_path}")
            if self.healthy():
                self.ready_after = time.monotonic() - self.started_at
                self._record_descendants()
                return self.ready_after
            if time.monotonic() > deadline:
                self.stop()
                raise TLQError(f"the vLLM server was not ready after {timeout or self.cfg.startup_timeout:.0f} s; "
                               f"see {self.log_path}, or raise the start-up timeout")
            time.sleep(0.5)

    def wait(self) -> int:
        """Block while the server runs (foreground `tlq serve`); returns its exit code."""
        while self.proc.poll() is None:
            self._record_descendants()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2.0)
        return self.proc.returncode

    def stop(self, sig: int = signal.SIGINT, grace: float = STOP_GRACE_S) -> int | None:
        """Forward `sig` to the server, SIGKILL its process group after `grace` s; idempotent."""
        if self.proc is None:
            return None
        self._record_descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            end = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < end and not self._force:
                time.sleep(0.2)
        self._kill_leftovers()
        rc = self.proc.wait()
        if self._own_run_dir and self.ready_after is not None and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # kept when start-up failed: it holds the log
        return rc

    def force(self) -> None:
        """A second Ctrl-C during `stop()`: stop waiting for a graceful shutdown."""
        self._force = True

    def _kill_leftovers(self, timeout: float = 10.0) -> None:
        import psutil
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # our session's group: engine, workers, trackers
        left = []
        for proc in self._descendants.values():  # psutil refuses to signal a pid reused since
            if _alive(proc):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                    left.append(proc)
        # SIGKILL is asynchronous: return only once they are gone (or zombies awaiting their reaper)
        _, alive = psutil.wait_procs(left, timeout=timeout)
        alive = [p for p in alive if _alive(p)]
        if alive:
            log.warning("processes %s of the server did not die after SIGKILL", [p.pid for p in alive])

    def _record_descendants(self) -> None:
        import psutil
        if self.proc is None or self.proc.poll() is not None:
            return  # once reaped, its pid may belong to someone else
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._descendants.setdefault(child.pid, child)

    def descendants(self) -> set[int]:
        """Pids of every process the server has forked so far (seen while polling)."""
        self._record_descendants()
        return set(self._descendants)

    def last_error(self, max_chars: int = 300) -> str:
        """The last line of the log that names an error, for one-line failure messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        for line in reversed(lines):
            if "Error" in line or "error" in line:
                return line.strip()[-max_chars:]
        return lines[-1].strip()[-max_chars:] if lines else "empty log"

    def __enter__(self):
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
