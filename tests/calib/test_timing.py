"""The report breaks wall time down by phase (tlq/calib/timing.py)."""
import json
import time

import tlq
from tlq.calib.timing import PHASES, phase_times, reset_phase_times, timed


def test_nested_phases_count_once():
    reset_phase_times()
    with timed("scale search"):
        time.sleep(0.02)
        with timed("statistics"):
            time.sleep(0.05)
    times = phase_times(0.1)
    assert 0.04 <= times["statistics"] < 0.07 and 0.01 <= times["scale search"] < 0.04
    assert abs(sum(times.values()) - 0.1) < 0.02 and set(times) == {*PHASES, "other"}


def test_report_breaks_a_tlq_run_down_by_phase(qwen2_vl_dir, tmp_path, capsys):
    ckpt = tlq.calibrate(qwen2_vl_dir, out=tmp_path / "c", method="tlq", max_samples=2, progress=False)
    report = json.loads((ckpt / "tlq_report.json").read_text())
    times = report["phase_seconds"]
    for phase in ("capture", "gradients", "statistics", "scale search", "solve", "write"):
        assert times[phase] > 0, phase
    assert abs(sum(times.values()) - report["total_seconds"]) < 0.05 * report["total_seconds"] + 0.05
    assert tlq.verify(ckpt)  # the report is outside the manifest: writing it last breaks nothing
