"""Why the vLLM server died, in one line: the dead process, its signal and its last Python frame.

Two things in the server's log make that possible:
- every vLLM process runs with PYTHONFAULTHANDLER=1 (see config.vllm_env), so a fatal signal
  (SIGILL, SIGSEGV, SIGBUS, SIGFPE, SIGABRT) writes "Fatal Python error: <what>" and the crashing
  thread's stack, innermost frame first;
- `report_exits()` (installed by serve.entry in every vLLM process) writes one EXIT_MARK line
  when a process vLLM started ends with a non-zero status, naming it and its signal. That is how
  an uncatchable SIGKILL (OOM killer, `kill -9`) is named: the dying process cannot say it.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_MARK = "[tlq] vLLM process exited:"
# faulthandler's words for the fatal signals it catches (Modules/faulthandler.c)
FAULTHANDLER_SIGNALS = {"Segmentation fault": "SIGSEGV", "Illegal instruction": "SIGILL", "Bus error": "SIGBUS",
                        "Floating point exception": "SIGFPE", "Aborted": "SIGABRT"}
_EXIT_LINE = re.compile(re.escape(EXIT_MARK) + r" (?P<name>\S+) pid (?P<pid>\d+) (?P<how>.+)$")
_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def describe_status(code: int) -> str:
    """A process exit code as Python reports it (-N for signal N) in words: "SIGKILL", "exit code 1"."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def short_path(path: str, parts: int = 2) -> str:
    return "/".join(Path(path).parts[-parts:])


# frames that only dispatch an operator: the frame worth naming is the first one below them
_DISPATCH_FUNCS = {"__call__", "__torch_function__", "_call_impl", "_wrapped_call_impl"}


def _frame(m: re.Match) -> str:
    return f"{short_path(m['path'])}:{m['line']} in {m['func']}"


def fatal_signal(lines: list[str]) -> tuple[str, str | None] | None:
    """(signal name, where) of the last faulthandler report in `lines`, or None.

    faulthandler lists every thread, the crashing one last under "Current thread"; its first frame
    is the innermost. Inside torch's operator dispatch that frame says little, so the first caller
    outside it is added ("torch/_ops.py:1279 in __call__, called from vllm/_custom_ops.py:... in cpu_gemm_wna16").
    """
    for i in range(len(lines) - 1, -1, -1):
        if "Fatal Python error: " not in lines[i]:
            continue
        what = lines[i].split("Fatal Python error: ", 1)[1].strip()
        name = FAULTHANDLER_SIGNALS.get(what, what)
        block = lines[i + 1:i + 2000]
        headers = [j for j, ln in enumerate(block) if ln.startswith(("Current thread ", "Thread "))]
        current = next((j for j in headers if block[j].startswith("Current thread ")), headers[0] if headers else None)
        frames = []
        for line in block[current + 1:] if current is not None else []:
            m = _FRAME.match(line)
            if not m:  # "<no Python frame>", or the blank line that ends the thread's block
                break
            frames.append(m)
        if not frames:
            return name, None
        where = _frame(frames[0])
        caller = next((m for m in frames if "/torch/" not in m["path"] and m["func"] not in _DISPATCH_FUNCS), None)
        if caller is not None and caller is not frames[0]:
            where += f", called from {_frame(caller)}"
        return name, where
    return None


def exit_reports(lines: list[str]) -> list[dict]:
    """Every EXIT_MARK line in `lines`, oldest first: {"name", "pid", "how"}."""
    out = []
    for line in lines:
        m = _EXIT_LINE.search(line.strip())
        if m:
            out.append({"name": m["name"], "pid": int(m["pid"]), "how": m["how"]})
    return out


def last_error_line(lines: list[str], max_chars: int = 200) -> str:
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line.strip()[-max_chars:]
    return lines[-1].strip()[-max_chars:] if lines else "empty log"


def crash_reason(log_text: str, dead: list[str] | None = None) -> str:
    """One line saying which vLLM process died, of what, and where; `dead` names processes seen gone.

    The first process reported dead is the cause: the ones vLLM ends while shutting down after
    it are reported later, with SIGTERM.
    """
    lines = log_text.splitlines()
    parts = []
    reports = exit_reports(lines)
    fatal = fatal_signal(lines)
    if reports:
        first = reports[0]
        parts.append(f"{first['name']} (pid {first['pid']}) {first['how']}")
    elif fatal:
        parts.append(f"a vLLM process died of {fatal[0]}")
    elif dead:
        parts.append(f"{', '.join(dead)} died")
    if fatal:
        if reports and fatal[0] not in parts[0]:
            parts.append(f"faulthandler: {fatal[0]}")
        parts.append(f"last frame {fatal[1]}" if fatal[1] else "no Python frame in the log")
    elif reports and "SIGKILL" in reports[0]["how"]:
        parts.append("no traceback: SIGKILL comes from outside (kill -9 or the kernel's OOM killer)")
    if not parts:
        parts.append(last_error_line(lines))
    return "; ".join(parts)


def _report(name: str, pid: int, code: int) -> None:
    how = f"killed by {describe_status(code)}" if code < 0 else f"exited with {describe_status(code)}"
    print(f"{EXIT_MARK} {name} pid {pid} {how}", file=sys.stderr, flush=True)


_started: dict[int, str] = {}  # pid -> name of children started in this process, not yet reported
_watcher_of: int | None = None  # the pid whose zombie watcher runs (threads do not survive fork)
WATCH_S = 0.5


def _settled(pid: int, code: int | None) -> None:
    name = _started.pop(pid, None)  # atomic: reported once, by whichever of poll / watcher sees it first
    if name is not None and code:
        _report(name, pid, code)


def _watch_zombies() -> None:
    """Report a dead child whose owner has not reaped it yet, without reaping it (WNOWAIT)."""
    while True:
        time.sleep(WATCH_S)
        for pid in list(_started):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped already (and reported by poll) or not ours
                _started.pop(pid, None)
                continue
            if info is not None:
                killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
                _settled(pid, -info.si_status if killed else info.si_status)


def report_exits() -> None:
    """In a vLLM process: print an EXIT_MARK line when a child it started ends with a non-zero status.

    multiprocessing learns a child's status in Popen.poll (is_alive, join, exitcode all go
    through it), which we wrap; vLLM's monitors read `exitcode` a moment too early (the child's
    pipe closes before it is a zombie) and may never reap it, so a thread also looks at dead,
    unreaped children every WATCH_S s without reaping them. Nothing vLLM sees changes.
    """
    from multiprocessing import popen_fork

    if getattr(popen_fork.Popen, "_tlq_reports", False):
        return
    original_init, original_poll = popen_fork.Popen.__init__, popen_fork.Popen.poll

    def __init__(self, process_obj):
        global _watcher_of
        original_init(self, process_obj)
        _started[self.pid] = str(getattr(process_obj, "name", "process")).replace(" ", "_")
        if _watcher_of != os.getpid():
            _watcher_of = os.getpid()
            threading.Thread(target=_watch_zombies, daemon=True, name="tlq-exit-reports").start()

    def poll(self, flag=os.WNOHANG):
        code = original_poll(self, flag)
        if code is not None:
            _settled(self.pid, code)
        return code

    popen_fork.Popen.__init__, popen_fork.Popen.poll = __init__, poll
    popen_fork.Popen._tlq_reports = True
