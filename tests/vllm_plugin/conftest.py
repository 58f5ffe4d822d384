"""Reports, at the end of the run, which CPU kernel paths of the plugin the tests exercised."""
from __future__ import annotations

import pytest

ISA_PATHS: dict[str, str] = {}  # path -> "native" or "simulated"


@pytest.fixture
def record_isa():
    def record(path: str, how: str) -> None:
        ISA_PATHS[path] = how
    return record


def pytest_terminal_summary(terminalreporter):
    if ISA_PATHS:
        ran = ", ".join(f"{path} ({how})" for path, how in sorted(ISA_PATHS.items()))
        terminalreporter.write_line(f"tlq plugin CPU kernel paths exercised: {ran}")
