"""The one-line crash reason, from real faulthandler output and real exit reports (no vLLM)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from serve.failure import EXIT_MARK, crash_reason, describe_status, exit_reports, fatal_signal

CRASH = textwrap.dedent("""
    import os, signal
    def kernel_call():
        os.kill(os.getpid(), signal.SIGILL)
    def apply():
        kernel_call()
    apply()
""")

# as in a vLLM worker: other threads (listed first by faulthandler) wait while one runs the kernel
CRASH_WITH_THREADS = textwrap.dedent("""
    import signal, threading, time
    def death_pipe_monitor():
        time.sleep(60)
    threading.Thread(target=death_pipe_monitor, daemon=True).start()
    time.sleep(0.2)
    def cpu_gemm_wna16():
        signal.pthread_kill(threading.get_ident(), signal.SIGILL)
    cpu_gemm_wna16()
""")

# a parent that reports its children's exits, as every vLLM process does through serve.entry
PARENT = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, time
    from serve.failure import report_exits
    report_exits()
    def idle():
        time.sleep(600)
    def done():
        pass
    ctx = mp.get_context("fork")
    ok = ctx.Process(target=done, name="Clean_0")
    ok.start(); ok.join()
    engine = ctx.Process(target=idle, name="EngineCore_DP0")
    engine.start()
    os.kill(engine.pid, signal.SIGKILL)
    if sys.argv[1] == "join":
        engine.join()
        print("exitcode", engine.exitcode, flush=True)
    else:  # as vLLM's monitors may: never reap it; the watcher thread reports the zombie
        time.sleep(2)
        print("state", open(f"/proc/{engine.pid}/stat").read().split()[2], flush=True)
        os._exit(0)  # no atexit join either
""")


def _run(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": os.getcwd(), **env})


def test_faulthandler_output_gives_signal_and_innermost_frame():
    res = _run(CRASH, PYTHONFAULTHANDLER="1")
    assert res.returncode == -signal.SIGILL
    lines = ("INFO some earlier line\n" + res.stderr).splitlines()
    assert fatal_signal(lines) == ("SIGILL", "<string>:4 in kernel_call")
    assert crash_reason("\n".join(lines)) == "a vLLM process died of SIGILL; last frame <string>:4 in kernel_call"


def test_the_crashing_thread_is_found_among_all_threads():
    res = _run(CRASH_WITH_THREADS, PYTHONFAULTHANDLER="1")
    assert res.returncode == -signal.SIGILL
    assert res.stderr.index("in death_pipe_monitor") < res.stderr.index("Current thread")  # listed first
    assert fatal_signal(res.stderr.splitlines()) == ("SIGILL", "<string>:8 in cpu_gemm_wna16")


@pytest.mark.parametrize("reaped", [True, False])
def test_a_killed_child_is_reported_by_its_parent(reaped):
    res = _run(PARENT, "join" if reaped else "leave")
    assert ("exitcode -9" if reaped else "state Z") in res.stdout, res.stderr
    reports = exit_reports(res.stderr.splitlines())
    assert [(r["name"], r["how"]) for r in reports] == [("EngineCore_DP0", "killed by SIGKILL")]  # not Clean_0
    reason = crash_reason(res.stderr)
    assert reason.startswith(f"EngineCore_DP0 (pid {reports[0]['pid']}) killed by SIGKILL; no traceback")


def test_first_death_is_the_cause_and_the_kernel_caller_is_named():
    """The structure of the worker's dump when issue 12's SIGILL was reproduced here (paths shortened)."""
    log = "\n".join([
        "(APIServer pid=10) INFO started",
        "Fatal Python error: Illegal instruction", "",
        "Thread 0x00007fdbdd9d36c0 (most recent call first):",
        '  File "/py/multiprocessing/connection.py", line 395 in _recv',
        '  File "/sp/vllm/v1/executor/multiproc_executor.py", line 841 in death_pipe_monitor', "",
        "Current thread 0x00007fdc7a8a27c0 (most recent call first):",
        '  File "/sp/torch/_ops.py", line 1279 in __call__',
        '  File "/sp/vllm/model_executor/parameter.py", line 124 in __torch_function__',
        '  File "/sp/torch/_ops.py", line 1279 in __call__',
        '  File "/sp/vllm/_custom_ops.py", line 4453 in cpu_gemm_wna16',
        '  File "/work/vllm_plugin/backends.py", line 309 in apply', "",
        "Extension modules: numpy._core._multiarray_umath, torch._C (total: 2)",
        f"{EXIT_MARK} VllmWorker-0 pid 11 killed by SIGILL",
        f"(APIServer pid=10) {EXIT_MARK} EngineCore pid 12 killed by SIGTERM",
    ])
    assert crash_reason(log) == ("VllmWorker-0 (pid 11) killed by SIGILL; last frame torch/_ops.py:1279 in __call__, "
                                 "called from vllm/_custom_ops.py:4453 in cpu_gemm_wna16")


def test_without_reports_the_dead_processes_or_the_last_error_are_named():
    assert crash_reason("boot\nRuntimeError: boom\nbye", dead=["VLLM::EngineCore_DP0 (pid 5)"]) == \
        "VLLM::EngineCore_DP0 (pid 5) died"
    assert crash_reason("boot\nRuntimeError: boom\nbye") == "RuntimeError: boom"


def test_status_words():
    assert describe_status(-9) == "SIGKILL" and describe_status(-4) == "SIGILL"
    assert describe_status(1) == "exit code 1" and describe_status(-200) == "signal 200"
