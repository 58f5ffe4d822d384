"""`tlq bench`: load-test a local OpenAI endpoint (or a checkpoint served for the run).

    workload (vLLM's random-mm requests: text, or text + one image) -> loadgen (vLLM's serving
    benchmark, `vllm bench serve`, once per concurrency level and round) -> stats (TTFT / TPOT / ITL /
    E2E percentiles, throughput, errors over a level's rounds) -> report (table, JSON, PNG)

Output folder: bench.json (our summary), bench.png (throughput and p50/p99 latency against
concurrency), vllm/<target>/c<concurrency>-r<round>.json (vLLM's result JSON, per request detailed)
and vllm/<target>/vllm-bench.log (vLLM's printed reports).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tlq.bench.workload import BenchConfig


@dataclass
class BenchTargets:
    """What to measure.

    Attributes:
        target: a local URL (http://127.0.0.1:PORT/v1) or a model folder served for the run.
        compare: a second URL or folder run with the same workload (e.g. the float model), or None.
        port: port for a folder served for the run (a second folder uses port + 1).
        api_key: bearer token of a URL target (and set on servers we start).
        model: served model name of a URL target (its first model when None).
        serve_overrides: ServeConfig fields for servers started here (e.g. max_num_seqs).
    """

    target: str
    compare: str | None = None
    port: int = 18400
    api_key: str | None = None
    model: str | None = None
    serve_overrides: dict | None = None


def label(target: str) -> str:
    return target if "://" in target else Path(target).resolve().name


def bench(targets: BenchTargets, cfg: BenchConfig, out: Path | None = None, echo=print) -> dict:
    """Run the sweep on `target` (and `compare`), print tables; with `out`, write the folder described above."""
    from serve.client import open_target
    from tlq.bench.loadgen import run_bench
    from tlq.bench.report import plot, print_levels, print_ratios, write_json
    from tlq.bench.stats import compare_levels

    cfg.validate()
    runs: dict[str, dict] = {}
    for i, tgt in enumerate(t for t in (targets.target, targets.compare) if t):
        name = label(tgt)
        if name in runs:
            name = f"{name}#{i + 1}"
        with open_target(tgt, targets.port + i, targets.api_key, targets.model if i == 0 else None,
                         targets.serve_overrides, echo=echo) as endpoint:
            echo(f"bench {name} (vllm bench serve): concurrency {cfg.concurrency}, {cfg.requests} requests "
                 f"per round, {cfg.max_tokens} output tokens, {cfg.image_fraction:.0%} with an image")
            vllm_dir = None if out is None else Path(out) / "vllm" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            runs[name] = run_bench(endpoint, cfg, echo=echo, result_dir=vllm_dir)
            if endpoint.server is not None and any(lv["errors"] for lv in runs[name]["levels"]):
                endpoint.server.keep_log = True  # a failed run keeps the server's log
                echo(f"  requests failed: {endpoint.server.status_line()}")
        print_levels(runs[name], f"tlq bench: {name}")
    result = {"runs": runs}
    names = list(runs)
    if len(names) == 2:
        result["ratios"] = {"subject": names[0], "reference": names[1],
                            "levels": compare_levels(runs[names[0]]["levels"], runs[names[1]]["levels"])}
        print_ratios(result["ratios"]["levels"], names[0], names[1])
    if out is not None:
        write_json(Path(out) / "bench.json", result)
        drawn = plot(runs, Path(out) / "bench.png")
        echo(f"results in {out}: bench.json{', bench.png' if drawn else ''}, vllm/ (vLLM's result JSON)")
    return result


__all__ = ["BenchConfig", "BenchTargets", "bench"]
