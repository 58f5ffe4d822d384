"""One concurrency level's summary from vLLM's per-request results (`vllm bench serve --save-detailed`).

vLLM summarises one run; a level of `tlq bench` can be several runs (rounds, until `min_seconds`),
so the level is summarised here from the pooled per-request data, with vLLM's definitions:
    TTFT  time from sending the request to the first streamed token.
    TPOT  per request, (latency - TTFT) / (output tokens - 1).
    ITL   every gap between two streamed tokens, pooled over requests.
    E2E   request latency.
    throughput  completed requests (output tokens) / the rounds' summed durations.
For one round these equal vLLM's own numbers (numpy's linear percentile, as vLLM uses).
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


def _error_kind(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "error")[:120]


def summarize(rounds: list[dict], concurrency: int, image_requests: int = 0) -> dict:
    """A level's summary from the detailed result dicts of its rounds (vLLM's JSON)."""
    ok, errors, sent, wall = [], [], 0, 0.0
    for r in rounds:
        wall += r["duration"]
        for i, err in enumerate(r["errors"]):
            sent += 1
            if err:
                errors.append(_error_kind(err))
            else:
                ok.append({"ttft": r["ttfts"][i], "itl": r["itls"][i], "e2e": r["latencies"][i],
                           "out": r["output_lens"][i], "in": r["input_lens"][i]})
    tokens = sum(o["out"] for o in ok)
    tpot = [(o["e2e"] - o["ttft"]) / (o["out"] - 1) for o in ok if o["out"] > 1]
    wall = max(wall, 1e-9)
    return {
        "concurrency": concurrency,
        "rounds": len(rounds),
        "sent": sent,
        "completed": len(ok),
        "errors": sent - len(ok),
        "error_kinds": dict(Counter(errors)),
        "image_requests": image_requests,
        "wall_s": round(wall, 3),
        "request_per_s": round(len(ok) / wall, 3),
        "output_tok_per_s": round(tokens / wall, 2),
        "output_tokens": tokens,
        "mean_prompt_tokens": round(sum(o["in"] for o in ok) / len(ok), 1) if ok else None,
        "ttft_ms": distribution_ms([o["ttft"] for o in ok]),
        "tpot_ms": distribution_ms(tpot),
        "itl_ms": distribution_ms([g for o in ok for g in o["itl"]]),
        "e2e_ms": distribution_ms([o["e2e"] for o in ok]),
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
