"""Latency percentiles and throughput of one concurrency level.

Definitions (all over successful requests):
    TTFT  time from sending the request to the first streamed token.
    TPOT  per request, (end-to-end - TTFT) / (output tokens - 1): mean time per later token.
    ITL   every gap between two streamed chunks, pooled over requests.
    throughput  completed requests / level wall time, and output tokens / level wall time.
"""
from __future__ import annotations

from collections import Counter

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default rule); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: list[float]) -> dict:
    """{"p50", "p90", "p99", "mean"} in milliseconds (None when empty)."""
    out = {f"p{q}": _ms(percentile(values_s, q)) for q in PERCENTILES}
    out["mean"] = _ms(sum(values_s) / len(values_s)) if values_s else None
    return out


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


def summarize(results, wall_s: float, concurrency: int) -> dict:
    """One level's summary from its RequestResults (see loadgen)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    wall = max(wall_s, 1e-9)
    return {
        "concurrency": concurrency,
        "sent": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "kinds": dict(Counter(r.kind for r in results)),
        "wall_s": round(wall_s, 3),
        "request_per_s": round(len(ok) / wall, 3),
        "output_tok_per_s": round(tokens / wall, 2),
        "output_tokens": tokens,
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "ttft_ms": distribution_ms([r.ttft for r in ok]),
        "tpot_ms": distribution_ms(tpot),
        "itl_ms": distribution_ms([g for r in ok for g in r.itl]),
        "e2e_ms": distribution_ms([r.e2e for r in ok]),
    }


def compare_levels(subject: list[dict], reference: list[dict]) -> list[dict]:
    """Per concurrency level, subject / reference ratios (>1 = subject higher) of the headline metrics."""
    ref = {lv["concurrency"]: lv for lv in reference}
    rows = []
    for lv in subject:
        other = ref.get(lv["concurrency"])
        if other is None:
            continue
        rows.append({
            "concurrency": lv["concurrency"],
            "output_tok_per_s": _ratio(lv["output_tok_per_s"], other["output_tok_per_s"]),
            "request_per_s": _ratio(lv["request_per_s"], other["request_per_s"]),
            "ttft_p50": _ratio(lv["ttft_ms"]["p50"], other["ttft_ms"]["p50"]),
            "tpot_p50": _ratio(lv["tpot_ms"]["p50"], other["tpot_ms"]["p50"]),
            "itl_p99": _ratio(lv["itl_ms"]["p99"], other["itl_ms"]["p99"]),
        })
    return rows


def _ratio(a, b) -> float | None:
    return None if a is None or not b else round(a / b, 3)
