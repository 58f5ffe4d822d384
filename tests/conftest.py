"""Shared pytest fixtures: tiny VLM checkpoints (built once per session) and the bundled calibration set.

Set TLQ_CACHE to reuse built checkpoints across sessions (they are keyed by arch/size/seed/tlq
version); otherwise they are built under pytest's session temp folder (about 1 s each).
"""
from __future__ import annotations

import os

import pytest

# One thread per process, as `make test` and .ci/run run it: tests that compare an in-process run
# with a CLI child (which calibrates at one thread) need the same thread count on both sides, and
# torch reads this when it is first imported (after this file).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ARCHS = ("qwen2-vl", "llava-onevision")


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory):
    env = os.environ.get("TLQ_CACHE")
    return env if env else tmp_path_factory.mktemp("tlq-fixtures")


def _tiny(arch: str, cache):
    from tlq.fixtures import ensure_fixture
    return ensure_fixture(arch, cache_root=cache, seed=0, size="tiny")


@pytest.fixture(scope="session")
def qwen2_vl_dir(fixture_cache):
    return _tiny("qwen2-vl", fixture_cache)


@pytest.fixture(scope="session")
def llava_onevision_dir(fixture_cache):
    return _tiny("llava-onevision", fixture_cache)


@pytest.fixture(scope="session", params=ARCHS, ids=ARCHS)
def tiny_model_dir(request, fixture_cache):
    """A tiny model dir, once per architecture; `request.param` is the arch name."""
    return _tiny(request.param, fixture_cache)


@pytest.fixture(scope="session")
def bundled_calib():
    from tlq.data.calib import bundled_calibration_path
    return bundled_calibration_path()


@pytest.fixture
def lmms_eval_installed():
    """lmms-eval (the `eval` extra) is there; skips without it, fails instead when TLQ_REQUIRE_EVAL=1 (CI)."""
    from importlib.util import find_spec
    if find_spec("lmms_eval") is None:
        if os.environ.get("TLQ_REQUIRE_EVAL") == "1":
            pytest.fail("lmms-eval is not installed, and TLQ_REQUIRE_EVAL=1 (CI installs the eval extra: "
                        "TLQ_EXTRAS=cpu,dev,eval)")
        pytest.skip("lmms-eval is not installed (pip install -e '.[eval]')")
