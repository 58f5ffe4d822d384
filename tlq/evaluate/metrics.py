"""Scores of one answer and their aggregation into a recovery table.

    exact match   normalised generated answer == normalised reference: lower case, single spaces,
                  no surrounding space, no final period. The one scorer of `tlq eval`, the quality
                  benchmark (benchmarks/quality_lib/evaluate.py) and the lmms-eval task `tlq lmms-task`
                  writes. Articles and inner punctuation stay: answers here are short ("top right",
                  "K", "A", "37"), and SQuAD's article rule would turn the glyph answer "A" into "",
                  which an empty prediction matches.
    agreement     the quantized model's normalised answer == the float model's.
    KL            mean over the reference answer's tokens of KL(P_fp || P_quant) of the next-token
                  distributions under teacher forcing. Exact from full logits (transformers backend);
                  from top-k logprobs (endpoint backend) it is estimated on the float model's listed
                  tokens plus one bucket for the rest, with a token missing from the quantized
                  model's list given that list's smallest probability.
    recovery      quantized exact match / float exact match, in percent (None when the float model
                  gets none right).
"""
from __future__ import annotations

import math
from collections import defaultdict


def normalize_answer(text: str) -> str:
    """Lower case, whitespace runs as one space, no surrounding space, no final period(s)."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def topk_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(P || Q) from two top-k logprob lists {token id: logprob} (see the module docstring)."""
    if not p or not q:
        return float("nan")
    floor = min(q.values())
    kl = p_sum = q_sum = 0.0
    for tok, lp in p.items():
        lq = q.get(tok, floor)
        pp = math.exp(lp)
        kl += pp * (lp - lq)
        p_sum += pp
        q_sum += math.exp(lq)
    p_rest, q_rest = max(1.0 - p_sum, 0.0), max(1.0 - q_sum, 1e-9)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def mean_kl(fp_positions: list, q_positions: list) -> float | None:
    """Mean KL over aligned answer positions; each position is a full log-prob tensor or a top-k dict."""
    n = min(len(fp_positions), len(q_positions))
    if n == 0:
        return None
    total = 0.0
    for p, q in zip(fp_positions[:n], q_positions[:n]):
        if isinstance(p, dict):
            total += topk_kl(p, q)
        else:  # full log-softmax vectors (torch)
            total += float((p.exp() * (p - q)).sum())
    return total / n


def aggregate(rows: list[dict]) -> list[dict]:
    """Recovery table rows, one per question type and one for "all", from per-sample rows.

    A per-sample row has: question_type, em_fp, em_quant, agree (bools), kl (float or None).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row.get("question_type") or "untyped"].append(row)
    table = [_summary(name, items) for name, items in sorted(groups.items())]
    table.append(_summary("all", rows))
    return table


def _summary(name: str, rows: list[dict]) -> dict:
    n = len(rows)
    em_fp = sum(r["em_fp"] for r in rows) / n
    em_q = sum(r["em_quant"] for r in rows) / n
    kls = [r["kl"] for r in rows if r.get("kl") is not None and not math.isnan(r["kl"])]
    return {
        "question_type": name, "n": n,
        "em_fp": round(100 * em_fp, 2), "em_quant": round(100 * em_q, 2),
        "recovery": round(100 * em_q / em_fp, 2) if em_fp > 0 else None,
        "agreement": round(100 * sum(r["agree"] for r in rows) / n, 2),
        "kl_mean": round(sum(kls) / len(kls), 6) if kls else None,
    }
