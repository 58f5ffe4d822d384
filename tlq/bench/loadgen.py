"""Asyncio load generator on the `openai` client: streaming chat requests at a fixed concurrency.

Per request it records the time to the first streamed token (TTFT), every gap between
streamed chunks (inter-token latency, ITL), the end-to-end latency and the output token
count from the final usage chunk. Each level is bounded twice: by a request count and by a
wall-clock budget after which no new request starts (requests in flight finish or time out).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from serve.client import Endpoint
from tlq.bench.stats import summarize
from tlq.bench.workload import BenchConfig, BenchRequest, build_requests

LEVEL_OFFSET = 1000  # seed offset between levels: no prompt or image repeats across levels


@dataclass
class RequestResult:
    """What one request measured; times in seconds. `error` is None for a success."""

    kind: str
    ok: bool = False
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def _error_name(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}{f' {status}' if status else ''}"


async def one_request(client, model: str, req: BenchRequest, cfg: BenchConfig) -> RequestResult:
    res = RequestResult(req.kind)
    t0 = time.perf_counter()

    async def stream_it():
        last = None
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": req.content}], max_tokens=cfg.max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                # vLLM sends the role together with the first token: the first chunk is the first token
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens

    try:
        await asyncio.wait_for(stream_it(), cfg.request_timeout)
        res.e2e = time.perf_counter() - t0
        res.ok = res.ttft is not None and res.output_tokens > 0
        if not res.ok:
            res.error = "EmptyResponse"
    except asyncio.TimeoutError:
        res.error = "Timeout"
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        res.error = _error_name(exc)
    return res


async def run_level(client, model: str, requests: list[BenchRequest], concurrency: int,
                    cfg: BenchConfig) -> tuple[list[RequestResult], float]:
    """Send `requests` with `concurrency` in flight; returns the results and the level's wall time."""
    queue = list(reversed(requests))
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    deadline = t0 + cfg.max_seconds

    async def worker():
        while queue and time.perf_counter() < deadline:
            results.append(await one_request(client, model, queue.pop(), cfg))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return results, time.perf_counter() - t0


async def _sweep(endpoint: Endpoint, cfg: BenchConfig, echo) -> list[dict]:
    client = endpoint.client(timeout=cfg.request_timeout, asynchronous=True)
    try:
        if cfg.warmup:
            warm = await asyncio.gather(*(one_request(client, endpoint.model, r, cfg)
                                          for r in build_requests(cfg, cfg.warmup, offset=0)))
            failed = [w.error for w in warm if not w.ok]
            if len(failed) == len(warm):
                echo(f"  warm-up: every request failed ({', '.join(failed)})")
        levels = []
        for i, conc in enumerate(cfg.concurrency):
            requests = build_requests(cfg, cfg.requests, offset=LEVEL_OFFSET * (i + 1))
            results, wall = await run_level(client, endpoint.model, requests, conc, cfg)
            level = summarize(results, wall, conc)
            echo(f"  concurrency {conc:>3}: {level['completed']}/{len(requests)} ok, {level['errors']} errors, "
                 f"{level['output_tok_per_s']:.1f} tok/s, TTFT p50 {level['ttft_ms']['p50']:.0f} ms, "
                 f"TPOT p50 {level['tpot_ms']['p50']:.1f} ms ({wall:.1f} s)")
            levels.append(level)
        return levels
    finally:
        await client.close()


def run_bench(endpoint: Endpoint, cfg: BenchConfig, echo=print) -> dict:
    """Warm up, then the concurrency sweep; returns {"model", "config", "levels": [...]}."""
    import dataclasses
    cfg.validate()
    levels = asyncio.run(_sweep(endpoint, cfg, echo))
    return {"model": endpoint.model, "url": endpoint.base, "config": dataclasses.asdict(cfg), "levels": levels}
