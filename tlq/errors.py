"""User-facing errors: one line naming the problem and the fix.

Everything the CLI catches as `TLQError` is printed as `error: <message>` with a
non-zero exit code and no traceback; any other exception is a bug.
"""


class TLQError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class CheckpointError(TLQError):
    """A packed checkpoint failed its integrity check (hashes, shapes, missing tensors, config)."""


class CalibrationDataError(TLQError):
    """The calibration JSONL file has bad lines; `problems` lists (file, line, problem)."""

    def __init__(self, problems: list[tuple[str, int, str]]):
        self.problems = problems
        shown = "; ".join(f"{f}:{n}: {p}" for f, n, p in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"{len(problems)} bad calibration line(s): {shown}{more}. "
                         "Fix or remove these lines; the format is described in docs/calibration-data.md")
