"""`tlq bench` without a server: workload, statistics, ratios, URL policy, report files."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest

from serve.client import api_base
from tlq.bench.loadgen import RequestResult, run_level
from tlq.bench.stats import compare_levels, percentile, summarize
from tlq.bench.workload import BenchConfig, build_requests, synthetic_image
from tlq.errors import TLQError


def test_percentile_matches_numpy():
    rs = np.random.RandomState(0)
    xs = list(rs.rand(37))
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_summarize_counts_errors_and_tokens():
    ok = [RequestResult("text", ok=True, ttft=0.1 * i, e2e=0.1 * i + 0.9, itl=[0.1] * 9, output_tokens=10,
                        prompt_tokens=20) for i in range(1, 5)]
    bad = [RequestResult("image224", error="BadRequestError 400")]
    s = summarize(ok + bad, wall_s=2.0, concurrency=4)
    assert (s["sent"], s["completed"], s["errors"]) == (5, 4, 1)
    assert s["error_kinds"] == {"BadRequestError 400": 1}
    assert s["output_tok_per_s"] == pytest.approx(20.0) and s["request_per_s"] == pytest.approx(2.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)  # 0.9 s over 9 later tokens
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0)


def test_compare_levels_ratios():
    a = [{"concurrency": 1, "output_tok_per_s": 200.0, "request_per_s": 2.0, "ttft_ms": {"p50": 50.0},
          "tpot_ms": {"p50": 5.0}, "itl_ms": {"p99": 10.0}}]
    b = [{"concurrency": 1, "output_tok_per_s": 100.0, "request_per_s": 1.0, "ttft_ms": {"p50": 100.0},
          "tpot_ms": {"p50": None}, "itl_ms": {"p99": 20.0}},
         {"concurrency": 8, "output_tok_per_s": 1.0}]
    (row,) = compare_levels(a, b)
    assert row["output_tok_per_s"] == 2.0 and row["ttft_p50"] == 0.5 and row["tpot_p50"] is None


def test_workload_is_seeded_mixed_and_never_repeats_images():
    cfg = BenchConfig(image_fraction=0.5, image_sizes=[64, 96], prompt_words=5, seed=3)
    a, b = build_requests(cfg, 40, offset=1000), build_requests(cfg, 40, offset=1000)
    assert a == b
    kinds = [r.kind for r in a]
    assert {"text", "image64", "image96"} <= set(kinds)
    urls = [r.content[0]["image_url"]["url"] for r in a if r.kind != "text"]
    assert len(set(urls)) == len(urls)
    from PIL import Image
    img = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert img.size == (64, 64)
    other = build_requests(cfg, 40, offset=2000)
    assert [r.content for r in other] != [r.content for r in a]
    assert all(r.kind == "text" for r in build_requests(BenchConfig(image_fraction=0.0), 10))
    assert synthetic_image(32, 1).tobytes() == synthetic_image(32, 1).tobytes()


@pytest.mark.parametrize("bad", [{"concurrency": [0]}, {"requests": 0}, {"image_fraction": 1.5},
                                 {"image_sizes": [8]}])
def test_bench_config_validation(bad):
    with pytest.raises(TLQError):
        BenchConfig(**bad).validate()


def test_only_local_urls():
    assert api_base("http://127.0.0.1:18400") == "http://127.0.0.1:18400/v1"
    assert api_base("http://127.0.0.1:18400/v1/") == "http://127.0.0.1:18400/v1"
    for url in ("http://example.com:8000/v1", "http://10.0.0.2:8000", "ftp://127.0.0.1/", "127.0.0.1:8000"):
        with pytest.raises(TLQError):
            api_base(url)


class _FakeCompletions:
    """Streams `n` chunks per request; records the peak number of requests in flight."""

    def __init__(self):
        self.in_flight = self.peak = self.calls = 0

    async def create(self, **kw):
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if kw["messages"][0]["content"] == "fail":
            self.in_flight -= 1
            raise RuntimeError("boom")
        return self._stream(kw["max_tokens"])

    async def _stream(self, n):
        from types import SimpleNamespace as NS
        for i in range(n):
            await asyncio.sleep(0.001)
            yield NS(choices=[NS()], usage=None)
        self.in_flight -= 1
        yield NS(choices=[], usage=NS(completion_tokens=n, prompt_tokens=7))


def test_run_level_bounds_concurrency_and_counts_errors():
    from types import SimpleNamespace as NS

    from tlq.bench.workload import BenchRequest
    fake = _FakeCompletions()
    client = NS(chat=NS(completions=fake))
    reqs = [BenchRequest("text", "fail" if i % 5 == 0 else f"q{i}") for i in range(20)]
    cfg = BenchConfig(max_tokens=4)
    results, wall = asyncio.run(run_level(client, "m", reqs, 3, cfg))
    assert len(results) == 20 and fake.peak == 3
    s = summarize(results, wall, 3)
    assert s["errors"] == 4 and s["error_kinds"] == {"RuntimeError": 4}
    assert s["output_tokens"] == 16 * 4 and all(len(r.itl) == 3 for r in results if r.ok)


def test_run_level_stops_at_the_time_budget():
    from types import SimpleNamespace as NS

    from tlq.bench.workload import BenchRequest
    fake = _FakeCompletions()
    cfg = BenchConfig(max_tokens=50, max_seconds=0.05)
    results, _ = asyncio.run(run_level(NS(chat=NS(completions=fake)), "m",
                                       [BenchRequest("text", "x")] * 100, 1, cfg))
    assert 1 <= len(results) < 100


def test_report_files(tmp_path):
    from tlq.bench.report import plot, write_json
    level = summarize([RequestResult("text", ok=True, ttft=0.1, e2e=0.5, itl=[0.1] * 4, output_tokens=5)], 1.0, 1)
    run = {"levels": [level, {**level, "concurrency": 4}]}
    write_json(tmp_path / "r.json", {"runs": {"a": run}})
    assert json.loads((tmp_path / "r.json").read_text())["runs"]["a"]["levels"][0]["completed"] == 1
    pytest.importorskip("matplotlib")
    assert plot({"a": run, "b": run}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
