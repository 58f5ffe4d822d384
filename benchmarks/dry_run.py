"""The `tlq calibrate --dry-run` host estimate, read back from its table for benchmarks to set
against measured peaks (issue 14: within +-15%)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def host_peaks_gib(calibrate_args: list[str]) -> list[float] | None:
    """Per-rank `host peak` (GiB) of `tlq calibrate ARGS --dry-run`; None when the table cannot be read."""
    cmd = [sys.executable, "-m", "tlq", "calibrate", *calibrate_args, "--dry-run"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if "host peak" in line), None)
    if header is None:
        return None
    column = re.split(r"\s{2,}", lines[header].strip()).index("host peak")
    peaks = []
    for line in lines[header + 1:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        try:
            peaks.append(float(cells[column]))
        except (ValueError, IndexError):
            return None
    return peaks or None
