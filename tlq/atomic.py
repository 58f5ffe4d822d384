"""Atomic file writes: a temporary file in the target's folder, then os.replace, so a reader
(or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_file_atomic(path: Path | str, data: str | bytes) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically, readable by all (0644)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints and data are shared read-only folders
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | str, data) -> None:
    write_file_atomic(path, json.dumps(data, indent=2) + "\n")
