"""`tlq bench` without a server: vLLM's benchmark arguments, level statistics, ratios, URL policy, report files."""
from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest

from serve.client import api_base
from tlq.bench.stats import compare_levels, percentile, summarize
from tlq.bench.workload import BenchConfig, vllm_argv
from tlq.errors import TLQError


def _round(ttfts, latencies, output_lens, errors=None, duration=2.0, itl=0.1):
    """A vLLM detailed result (the fields of `vllm bench serve --save-detailed` that tlq reads)."""
    n = len(ttfts)
    return {"duration": duration, "ttfts": ttfts, "latencies": latencies, "output_lens": output_lens,
            "input_lens": [20] * n, "itls": [[itl] * max(k - 1, 0) for k in output_lens],
            "errors": errors or [""] * n}


def test_percentile_matches_numpy():
    rs = np.random.RandomState(0)
    xs = list(rs.rand(37))
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_summarize_pools_rounds_counts_errors_and_tokens():
    ok = _round([0.1, 0.2], [1.0, 1.1], [10, 10], duration=2.0)
    mixed = _round([0.3, 0.0, 0.4], [1.2, 0.0, 1.3], [10, 0, 10], duration=2.0,
                   errors=["", "Traceback...\naiohttp.ClientResponseError: 400, Bad Request", ""])
    s = summarize([ok, mixed], concurrency=4, image_requests=2)
    assert (s["rounds"], s["sent"], s["completed"], s["errors"], s["image_requests"]) == (2, 5, 4, 1, 2)
    assert s["error_kinds"] == {"aiohttp.ClientResponseError: 400, Bad Request": 1}
    assert s["output_tok_per_s"] == pytest.approx(40 / 4.0) and s["request_per_s"] == pytest.approx(1.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0) and s["e2e_ms"]["p50"] == pytest.approx(1150.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)  # (1.1 - 0.2) s over 9 later tokens, and alike
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)


def test_one_round_summary_equals_vllms_own_percentiles():
    """For one round the level numbers are vLLM's (np.percentile, TPOT over requests with > 1 token)."""
    rs = np.random.RandomState(1)
    ttfts = list(rs.rand(50) * 0.2)
    outs = list(rs.randint(1, 30, 50))
    lat = [t + 0.01 * k for t, k in zip(ttfts, outs)]
    s = summarize([_round(ttfts, lat, outs)], 8)
    tpots = [(lt - t) / (k - 1) for t, lt, k in zip(ttfts, lat, outs) if k > 1]
    for q in (50, 90, 99):
        assert s["ttft_ms"][f"p{q}"] == pytest.approx(np.percentile(ttfts, q) * 1000, abs=1e-3)
        assert s["tpot_ms"][f"p{q}"] == pytest.approx(np.percentile(tpots, q) * 1000, abs=1e-3)
        assert s["e2e_ms"][f"p{q}"] == pytest.approx(np.percentile(lat, q) * 1000, abs=1e-3)


def test_compare_levels_ratios():
    a = [{"concurrency": 1, "output_tok_per_s": 200.0, "request_per_s": 2.0, "ttft_ms": {"p50": 50.0},
          "tpot_ms": {"p50": 5.0}, "itl_ms": {"p99": 10.0}}]
    b = [{"concurrency": 1, "output_tok_per_s": 100.0, "request_per_s": 1.0, "ttft_ms": {"p50": 100.0},
          "tpot_ms": {"p50": None}, "itl_ms": {"p99": 20.0}},
         {"concurrency": 8, "output_tok_per_s": 1.0}]
    (row,) = compare_levels(a, b)
    assert row["output_tok_per_s"] == 2.0 and row["ttft_p50"] == 0.5 and row["tpot_p50"] is None


@pytest.mark.parametrize("bad", [{"concurrency": [0]}, {"requests": 0}, {"image_fraction": 0.3},
                                 {"image_sizes": [8]}, {"min_seconds": -1}])
def test_bench_config_validation(bad):
    with pytest.raises(TLQError):
        BenchConfig(**bad).validate()


@pytest.mark.vllm
@pytest.mark.skipif(find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.parametrize(("fraction", "base", "ratio"), [(0.0, 0, 0.0), (0.5, 1, 1.0), (1.0, 1, 0.0)])
def test_vllm_parses_the_arguments(fraction, base, ratio):
    """vLLM's own `bench serve` parser takes what tlq passes, with the meaning tlq intends."""
    import vllm.benchmarks.serve as vbs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    vbs.add_cli_args(parser)
    cfg = BenchConfig(requests=7, max_tokens=5, input_tokens=9, image_sizes=[64, 96], image_fraction=fraction)
    a = parser.parse_args(vllm_argv(cfg, "http://127.0.0.1:9", "served", "/models/m", 3, seed=11, warmup=2,
                                    result_dir="/tmp/r", result_file="c3-r0.json"))
    assert (a.dataset_name, a.backend, a.endpoint, a.base_url) == ("random-mm", "openai-chat",
                                                                  "/v1/chat/completions", "http://127.0.0.1:9")
    assert (a.num_prompts, a.max_concurrency, a.random_input_len, a.random_output_len) == (7, 3, 9, 5)
    assert (a.random_mm_base_items_per_request, a.random_mm_num_mm_items_range_ratio) == (base, ratio)
    assert a.random_mm_limit_mm_per_prompt == {"image": 1, "video": 0}
    assert a.random_mm_bucket_config == {(64, 64, 1): 0.5, (96, 96, 1): 0.5}
    assert (a.model, a.served_model_name, a.tokenizer) == ("/models/m", "served", "/models/m")
    assert a.ignore_eos and a.temperature == 0.0 and a.seed == 11 and a.num_warmups == 2
    assert a.save_result and a.save_detailed and (a.result_dir, a.result_filename) == ("/tmp/r", "c3-r0.json")


def test_only_local_urls():
    assert api_base("http://127.0.0.1:18400") == "http://127.0.0.1:18400/v1"
    assert api_base("http://127.0.0.1:18400/v1/") == "http://127.0.0.1:18400/v1"
    for url in ("http://example.com:8000/v1", "http://10.0.0.2:8000", "ftp://127.0.0.1/", "127.0.0.1:8000"):
        with pytest.raises(TLQError):
            api_base(url)


def test_report_files(tmp_path):
    from tlq.bench.report import plot, print_levels, write_json
    level = {**summarize([_round([0.1], [0.5], [5])], 1, 1), "server_rss_mib": 512.0}
    run = {"levels": [level, {**level, "concurrency": 4}]}
    print_levels(run, "t")
    write_json(tmp_path / "r.json", {"runs": {"a": run}})
    assert json.loads((tmp_path / "r.json").read_text())["runs"]["a"]["levels"][0]["completed"] == 1
    pytest.importorskip("matplotlib")
    assert plot({"a": run, "b": run}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
