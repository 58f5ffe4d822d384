"""Load and validate a calibration JSONL file (format: docs/calibration-data.md).

Every line is checked before anything is returned, and all bad lines are reported
together, so a user fixes the file in one pass instead of one error per run.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tlq.errors import CalibrationDataError, TLQError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("image", "text")


@dataclass(frozen=True)
class CalibSample:
    """One validated calibration conversation.

    Attributes:
        id: the line's "id", or "<file stem>:<line number>" when absent.
        messages: chat messages as in the file; the last is the assistant answer.
        image_paths: absolute paths of the images, in the order of the {"type": "image"} parts.
        question_type: free-form category (e.g. "count"), None when absent.
        sha256: hex digest over the raw line and the bytes of its images, for provenance.
    """

    id: str
    messages: list
    image_paths: list[Path]
    question_type: str | None
    sha256: str

    @property
    def answer(self) -> str:
        return answer_text(self.messages[-1])


def bundled_calibration_path() -> Path:
    """The small calibration set shipped with TLQ (see tlq/data/make_bundled.py)."""
    return Path(__file__).resolve().parent / "bundled" / "calib.jsonl"


def answer_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content
                   if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))


def _message_problems(messages) -> tuple[list[str], int]:
    """Problems with the "messages" field, and the number of image parts found."""
    if not isinstance(messages, list) or not messages:
        return ['"messages" must be a non-empty list of chat messages'], 0
    problems, n_images = [], 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            problems.append(f"message {i} is not an object")
            continue
        if msg.get("role") not in ROLES:
            problems.append(f"message {i} has unknown role {msg.get('role')!r} (use {', '.join(ROLES)})")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            problems.append(f"message {i} content must be a string or a list of parts")
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                problems.append(f"message {i} has a part of unknown type {kind!r} (use image or text)")
            elif kind == "text" and not isinstance(part.get("text"), str):
                problems.append(f"message {i} has a text part without a string \"text\"")
            n_images += kind == "image"
    last = messages[-1]
    last_content = last.get("content") if isinstance(last, dict) else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        problems.append("the last message must be the assistant answer")
    elif isinstance(last_content, list) and any(isinstance(p, dict) and p.get("type") == "image"
                                                for p in last_content):
        problems.append("the final assistant answer must be text only")
    elif isinstance(last_content, (str, list)) and not answer_text(last).strip():
        problems.append("the final assistant answer has empty text")
    return problems, n_images


def _image_problems(images, base: Path, digest) -> tuple[list[str], list[Path]]:
    """Check every image opens and verifies with PIL; hash its bytes into `digest`."""
    from PIL import Image

    if images is None:
        return [], []
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        return ['"images" must be a list of path strings'], []
    problems, paths = [], []
    for name in images:
        path = (base / name).resolve()
        paths.append(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"image {name!r} cannot be read ({exc.strerror or exc})")
            continue
        digest.update(data)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            problems.append(f"image {name!r} is not a readable image ({type(exc).__name__}: {exc})")
    return problems, paths


def parse_line(raw: bytes, base: Path, default_id: str) -> tuple[CalibSample | None, list[str]]:
    """Validate one JSONL line; return the sample, or None and the list of problems."""
    digest = hashlib.sha256(raw)
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"invalid JSON ({exc})"]
    if not isinstance(record, dict):
        return None, ["a line must be a JSON object"]
    problems, n_parts = _message_problems(record.get("messages"))
    image_problems, paths = _image_problems(record.get("images"), base, digest)
    problems += image_problems
    if not image_problems and n_parts != len(paths):
        problems.append(f"{n_parts} image part(s) in messages but {len(paths)} image(s) listed")
    sample_id = record.get("id", default_id)
    qtype = record.get("question_type")
    if not isinstance(sample_id, str) or not sample_id:
        problems.append('"id" must be a non-empty string')
    if qtype is not None and not isinstance(qtype, str):
        problems.append('"question_type" must be a string')
    if problems:
        return None, problems
    return CalibSample(sample_id, record["messages"], paths, qtype, digest.hexdigest()), []


def load_calibration(path, max_samples: int | None = None) -> list[CalibSample]:
    """Read and validate every line of `path`; return the first `max_samples` samples.

    Raises CalibrationDataError listing (file, line, problem) for every bad line, and
    TLQError when the file is missing or holds no samples.
    """
    path = Path(path)
    if max_samples is not None and max_samples < 1:
        raise TLQError(f"max_samples must be at least 1, got {max_samples}")
    if not path.is_file():
        raise TLQError(f"calibration file {path} not found; pass a JSONL file "
                       "(format: docs/calibration-data.md) or omit it to use the bundled set")
    samples, problems, seen = [], [], set()
    base = path.resolve().parent
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are allowed
        sample, line_problems = parse_line(raw, base, f"{path.stem}:{lineno}")
        if sample is not None and sample.id in seen:
            line_problems = [f"duplicate id {sample.id!r}"]
        problems += [(str(path), lineno, p) for p in line_problems]
        if not line_problems:
            seen.add(sample.id)
            samples.append(sample)
    if problems:
        raise CalibrationDataError(problems)
    if not samples:
        raise TLQError(f"calibration file {path} holds no samples; add JSONL lines "
                       "(format: docs/calibration-data.md)")
    return samples[:max_samples] if max_samples is not None else samples
