"""Atomic writes (tlq/atomic.py): all or nothing, and a full disk is one clear error."""
import errno
import os
import re

import pytest
import torch

from tlq import atomic
from tlq.atomic import save_torch_atomic, write_file_atomic
from tlq.errors import TLQError


class FullDiskFile:
    """A file that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def disk_with_room(monkeypatch):
    def make(room):
        real = os.fdopen
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDiskFile(real(fd, mode), room))
    return make


def test_full_disk_is_one_error_and_keeps_the_old_file(tmp_path, disk_with_room):
    target = tmp_path / "state.pt"
    save_torch_atomic(target, {"x": torch.arange(4)})
    before = target.read_bytes()
    disk_with_room(200)
    with pytest.raises(TLQError) as err:
        save_torch_atomic(target, {"x": torch.zeros(10_000)})
    msg = str(err.value)
    assert msg.startswith(f"disk full in {tmp_path}:") and "used" in msg and "free of" in msg
    needed = float(re.search(r"needs about ([0-9.]+) KiB", msg).group(1))
    assert 39.0 < needed < 45.0  # 10k float32 = 39.1 KiB plus the zip framing
    assert "run the same command again" in msg and "\n" not in msg
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def broken(fd, mode):
        os.close(fd)
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(atomic.os, "fdopen", broken)
    with pytest.raises(PermissionError):
        write_file_atomic(tmp_path / "a.txt", "hello")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_markers():
    assert atomic.is_disk_full(OSError(errno.ENOSPC, "x")) is True
    assert atomic.is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    assert atomic.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")) is None
    assert atomic.is_disk_full(ValueError("bad")) is False
