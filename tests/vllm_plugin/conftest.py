"""Shared by the plugin tests: one simulated tensor-parallel rank, and a closing line saying which
CPU kernel paths of the plugin the tests exercised."""
from __future__ import annotations

import pytest

ISA_PATHS: dict[str, str] = {}  # path -> "native" or "simulated"


@pytest.fixture
def single_rank(monkeypatch):
    """vLLM parameters read the TP rank at construction; outside an engine there is one rank."""
    import vllm.model_executor.parameter as p
    monkeypatch.setattr(p, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(p, "get_tensor_model_parallel_world_size", lambda: 1)
    for env in ("TLQ_LINEAR_BACKEND", "TLQ_CPU_FAST_INT4"):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def record_isa():
    def record(path: str, how: str) -> None:
        ISA_PATHS[path] = how
    return record


def pytest_terminal_summary(terminalreporter):
    if ISA_PATHS:
        ran = ", ".join(f"{path} ({how})" for path, how in sorted(ISA_PATHS.items()))
        terminalreporter.write_line(f"tlq plugin CPU kernel paths exercised: {ran}")
