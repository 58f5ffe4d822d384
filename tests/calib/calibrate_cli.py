"""`tlq calibrate` in a child process, for tests that kill a run, fill its disk, or resume it."""
import os
import subprocess
import sys


def calibrate_cli(model, out, *flags, die_after_layer: int | None = None) -> subprocess.CompletedProcess:
    """Run `tlq calibrate MODEL --out OUT --quiet FLAGS...` (one thread); `die_after_layer` kills it
    with exit code 17 once that layer is saved (TLQ_TEST_DIE_AFTER_LAYER)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if die_after_layer is not None:
        env["TLQ_TEST_DIE_AFTER_LAYER"] = str(die_after_layer)
    args = [sys.executable, "-m", "tlq", "calibrate", str(model), "--out", str(out), "--quiet", *map(str, flags)]
    return subprocess.run(args, env=env, capture_output=True, text=True, check=False)
