"""Wall time per calibration phase, for the report: where a run's time went, without a profiler.

Phases: capture, gradients (the gradient pass), statistics (gathering each linear group's inputs),
damping (the held-out damping choice), scale search (input scaling), solve (the solver table:
Hessians, exposure target, GPTQ / RTN),
write (assembling and writing the checkpoint). What no phase covers (layer forwards for targets and
the next layer's inputs, saving resumable results) is reported as "other". Process-wide: each rank
of a multi-rank run reports its own. On CUDA, kernels are asynchronous: a phase's time includes the
work still queued from the one before (each layer's outputs come back to the host, which waits for them).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("capture", "gradients", "statistics", "damping", "scale search", "solve", "write")
_SECONDS: dict[str, float] = defaultdict(float)
_OPEN: list[list] = []  # [phase, seconds spent in nested phases] of the blocks now running


@contextmanager
def timed(phase: str):
    """Add the wall time of the `with` block to `phase`; time spent in a nested `timed` block counts
    for the inner phase only (gathering inputs inside the scale search is statistics)."""
    t0 = time.perf_counter()
    _OPEN.append([phase, 0.0])
    try:
        yield
    finally:
        _, nested = _OPEN.pop()
        spent = time.perf_counter() - t0
        _SECONDS[phase] += spent - nested
        if _OPEN:
            _OPEN[-1][1] += spent


def reset_phase_times() -> None:
    _SECONDS.clear()


def phase_times(total_seconds: float) -> dict[str, float]:
    """Seconds per phase (every phase listed, 0 when it did not run) and `other`."""
    times = {p: round(_SECONDS.get(p, 0.0), 2) for p in PHASES}
    times["other"] = round(max(total_seconds - sum(times.values()), 0.0), 2)
    return times


def format_phase_times(times: dict[str, float]) -> str:
    total = sum(times.values()) or 1.0
    return "time by phase: " + ", ".join(f"{p} {s:.1f} s ({100 * s / total:.0f}%)" for p, s in times.items())
