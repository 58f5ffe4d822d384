"""Atomic file writes: a temporary file in the target's folder, then os.replace, so a reader
(or a crash) sees the old file or the new one, never half of one.

A full disk (ENOSPC / EDQUOT, or torch's and safetensors' wrapped forms of it) becomes one
`TLQError` naming the folder, its space used and free, and roughly what the write needed; the
half-written temporary file is removed, so what was there before stays valid.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tlq.errors import TLQError

# how a full disk surfaces through torch.save ("inline_container.cc ... unexpected pos") and
# safetensors ("IoError(Os { code: 28, kind: StorageFull ... })")
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "code: 28")


def is_disk_full(exc: BaseException) -> bool | None:
    """True: the disk is full; None: maybe (torch's zip writer reports a failed write only as a
    position mismatch, "unexpected pos"); False: another error."""
    seen = exc
    while seen is not None:  # torch.save hides the OSError behind its own RuntimeError
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if any(marker in text for marker in _DISK_FULL_TEXT):
        return True
    return None if "unexpected pos" in text else False


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def disk_full_error(folder: Path, needed: int | None) -> TLQError:
    usage = shutil.disk_usage(folder)
    need = f"; this write needs about {_size(needed)}" if needed else ""
    return TLQError(f"disk full in {folder}: {_size(usage.used)} used, {_size(usage.free)} free of "
                    f"{_size(usage.total)}{need}; free space there (or write elsewhere) and run the same "
                    "command again: calibration resumes from its last finished layer")


@contextmanager
def disk_full_guard(folder: Path | str, needed: Callable[[], int] | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into `disk_full_error(folder, needed())`."""
    try:
        yield
    except TLQError:
        raise
    except Exception as exc:
        full = is_disk_full(exc)
        if full is False:
            raise
        size = needed() if needed is not None else None
        if full is None and (size is None or shutil.disk_usage(folder).free >= size):
            raise  # a position mismatch with room to spare: not a full disk
        raise disk_full_error(Path(folder), size) from None


class _ByteCounter:
    """A write-only sink that only counts (how much a failed write needed)."""

    def __init__(self):
        self.count = 0

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def write_atomic(path: Path | str, write: Callable[[BinaryIO], object]) -> None:
    """Fill `path` atomically with what `write(f)` writes to a binary file, readable by all (0644)."""
    path = Path(path)

    def needed() -> int:
        counter = _ByteCounter()
        write(counter)
        return counter.count

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with disk_full_guard(path.parent, needed), os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints and data are shared read-only folders
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file_atomic(path: Path | str, data: str | bytes) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically."""
    write_atomic(path, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def save_torch_atomic(path: Path | str, obj) -> None:
    """`torch.save(obj)` to `path` atomically (resumable work files)."""
    import torch
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(path: Path | str, data) -> None:
    write_file_atomic(path, json.dumps(data, indent=2) + "\n")
