"""Run vLLM's own serving benchmark (`vllm bench serve`, module vllm.benchmarks.serve) per level.

vLLM generates the requests (random-mm dataset), sends them at a fixed --max-concurrency,
times every token, and writes its result JSON (one file per round, detailed). `vllm bench serve`
runs one configuration per call; what tlq adds is what a load test across levels needs:
  * the concurrency sweep, and rounds that keep a level under load for at least `min_seconds`
    (the sum of vLLM's measured run durations: set-up between runs does not count);
  * the count of image requests (vLLM does not report which requests carried an image);
  * the server's resident memory (the listening process and its children) after the first
    level's warm-up and after every level;
  * the level summary over all rounds (stats.py), and (report.py) the table, the ratios of two
    targets and the PNG chart across levels.
vLLM's printed report of each round goes to <result_dir>/vllm-bench.log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import urllib.request
from pathlib import Path

from serve.client import Endpoint
from tlq.bench.stats import summarize
from tlq.bench.workload import BenchConfig, vllm_argv
from tlq.errors import TLQError

LEVEL_SEED_STEP = 1000  # round r of level i uses seed + 1000 * i + r: no two rounds repeat a request


def model_root(endpoint: Endpoint) -> str:
    """The folder the server loaded `endpoint.model` from (its /v1/models `root`): vLLM's tokenizer."""
    req = urllib.request.Request(endpoint.base + "/models")
    if endpoint.api_key:
        req.add_header("Authorization", f"Bearer {endpoint.api_key}")
    with urllib.request.urlopen(req, timeout=10) as r:
        entries = json.load(r)["data"]
    root = next((m.get("root") for m in entries if m["id"] == endpoint.model), None)
    if not root or not Path(root).is_dir():
        raise TLQError(f"{endpoint.base} does not name a local folder for {endpoint.model!r} (root {root!r}); "
                       "vLLM's benchmark needs the model's tokenizer on this machine")
    return root


def server_rss_mib(port: int) -> float | None:
    """Resident memory (MiB) of the process listening on 127.0.0.1:`port` plus its children; None if not found."""
    import psutil
    pid = next((c.pid for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid), None)
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


@contextlib.contextmanager
def _counting_image_requests(counts: list[int]):
    """Count, per vLLM run, the sampled requests that carry multimodal data (vLLM keeps no such count)."""
    import vllm.benchmarks.serve as vbs
    original = vbs.get_samples

    def counting(args, tokenizer):
        samples = original(args, tokenizer)
        counts.append(sum(1 for s in samples if s.multi_modal_data))
        return samples

    vbs.get_samples = counting
    try:
        yield
    finally:
        vbs.get_samples = original


def run_round(argv: list[str], log) -> tuple[dict, int]:
    """One `vllm bench serve` call in this process; its detailed result dict and image-request count."""
    import vllm.benchmarks.serve as vbs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser(description="vllm bench serve")
    vbs.add_cli_args(parser)
    args = parser.parse_args(argv)
    counts: list[int] = []
    with _counting_image_requests(counts), contextlib.redirect_stdout(log):
        result = vbs.main(args)
    return result, counts[0] if counts else 0


def run_bench(endpoint: Endpoint, cfg: BenchConfig, echo=print, result_dir: Path | None = None) -> dict:
    """The concurrency sweep; returns {"model", "url", "config", "levels": [...], "vllm_results": [...]}.

    vLLM's result JSONs go to `result_dir` (a temporary folder, removed afterwards, when None).
    """
    import tempfile
    cfg.validate()
    base_url = endpoint.base.removesuffix("/v1")
    port = int(base_url.rsplit(":", 1)[1])
    tokenizer = model_root(endpoint)
    keep = result_dir is not None
    with contextlib.ExitStack() as stack:
        if result_dir is None:
            result_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tlq-bench-")))
        result_dir = Path(result_dir)
        result_dir.mkdir(parents=True, exist_ok=True)
        log = stack.enter_context(open(result_dir / "vllm-bench.log", "a"))
        if endpoint.api_key:
            stack.enter_context(_api_key_env(endpoint.api_key))
        levels, files, rss_warm = [], [], None
        for i, conc in enumerate(cfg.concurrency):
            rounds, images = [], 0
            while not rounds or sum(r["duration"] for r in rounds) < cfg.min_seconds:
                name = f"c{conc}-r{len(rounds)}.json"
                argv = vllm_argv(cfg, base_url, endpoint.model, tokenizer, conc,
                                 seed=cfg.seed + LEVEL_SEED_STEP * i + len(rounds),
                                 warmup=cfg.warmup if not rounds else 0, result_dir=str(result_dir),
                                 result_file=name)
                result, n_images = run_round(argv, log)
                if rss_warm is None:  # after the first round: warm-up and first requests have run
                    rss_warm = server_rss_mib(port)
                rounds.append(result)
                images += n_images
                files.append(str(result_dir / name))
            level = summarize(rounds, conc, images)
            level["server_rss_mib"] = server_rss_mib(port)
            echo(f"  concurrency {conc:>3}: {level['completed']}/{level['sent']} ok ({images} with an image), "
                 f"{level['errors']} errors, {level['output_tok_per_s']:.1f} tok/s, "
                 f"e2e p50/p99 {_ms(level['e2e_ms']['p50'])}/{_ms(level['e2e_ms']['p99'])} ms, "
                 f"TTFT p50 {_ms(level['ttft_ms']['p50'])} ms ({level['wall_s']:.1f} s, {len(rounds)} round(s))")
            levels.append(level)
    return {"model": endpoint.model, "url": endpoint.base, "config": dataclasses.asdict(cfg), "levels": levels,
            "server_rss_after_warmup_mib": rss_warm,
            "vllm_results": files if keep else []}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


@contextlib.contextmanager
def _api_key_env(key: str):
    """vLLM's request functions read the bearer token from OPENAI_API_KEY."""
    import os
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = key
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old
