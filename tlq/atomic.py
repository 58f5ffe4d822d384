"""Atomic file writes: a temporary file in the target's folder, then os.replace, so a reader
(or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path | str, write: Callable[[BinaryIO], object]) -> None:
    """Fill `path` atomically with what `write(f)` writes to a binary file, readable by all (0644)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
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
