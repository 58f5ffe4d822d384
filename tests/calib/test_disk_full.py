"""A calibration whose disk fills: one error line, nothing at OUT, and it resumes once space is freed.

Runs on a real small tmpfs (mounted by the test; needs root and mount rights, as CI has here);
tests/test_atomic.py fakes the same error without a mount.
"""
import shutil
import subprocess

import pytest
from calibrate_cli import calibrate_cli

from tlq.multirank.writer import tensor_hashes


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); tests/test_atomic.py covers "
                    "the error with a faked full disk")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def folder_size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_full_disk_mid_run_then_resume(qwen2_vl_dir, tmp_path, small_disk):
    flags = ("--method", "gptq", "--scheme", "w4a16", "--max-samples", "2")
    clean = calibrate_cli(qwen2_vl_dir, tmp_path / "clean", *flags)
    assert clean.returncode == 0, clean.stderr
    # what the work folder holds after the first layer: room for that, not for the second layer
    probe = calibrate_cli(qwen2_vl_dir, tmp_path / "probe", *flags, die_after_layer=0)
    assert probe.returncode == 17, probe.stderr
    first_layer = folder_size(tmp_path / ".probe.work")
    free = shutil.disk_usage(small_disk).free
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (free - int(first_layer * 1.5)))

    out = small_disk / "ckpt"
    full = calibrate_cli(qwen2_vl_dir, out, *flags)
    assert full.returncode == 2, full.stderr
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and errors[0].startswith(f"error: disk full in {small_disk}"), full.stderr
    assert "used" in errors[0] and "needs about" in errors[0] and "Traceback" not in full.stderr
    assert not out.exists(), "nothing may be left at OUT"
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".ckpt.tmp")]
    work = small_disk / ".ckpt.work"
    assert (work / "layer_0000.pt").is_file(), sorted(p.name for p in work.iterdir())

    ballast.unlink()  # space freed: the same command resumes and finishes
    again = calibrate_cli(qwen2_vl_dir, out, *flags)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert tensor_hashes(out) == tensor_hashes(tmp_path / "clean")
