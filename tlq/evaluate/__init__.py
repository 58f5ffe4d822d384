"""`tlq eval`: accuracy of a checkpoint against its float model on a JSONL QA set.

    questions (calibration JSONL; last assistant turn = reference; optional question_type)
    -> score both models (endpoint: vLLM serving each in turn; or transformers: both in memory)
    -> per-sample exact match, agreement, KL -> recovery table split by question type
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tlq.errors import TLQError
from tlq.evaluate.metrics import aggregate, exact_match, mean_kl, normalize_answer

BACKENDS = ("endpoint", "transformers")


@dataclass
class EvalConfig:
    """One evaluation.

    Attributes:
        checkpoint: the quantized checkpoint folder, or (endpoint backend) a local URL serving it.
        fp: the float model folder, or (endpoint backend) a local URL serving it.
        data: QA JSONL (calibration format); the bundled set when None.
        backend: "endpoint" (vLLM, each model served in turn) or "transformers" (dequantized weights).
        max_samples: evaluate at most this many questions.
        max_new_tokens: generation budget of each answer (greedy).
        top_k: logprobs per position requested from the endpoint for the KL estimate.
        port: port for a folder served here (the float model uses port + 1).
        api_key: bearer token of URL targets.
        workers: questions in flight at once against an endpoint.
        device: transformers device.
    """

    checkpoint: str
    fp: str
    data: Path | None = None
    backend: str = "endpoint"
    max_samples: int | None = None
    max_new_tokens: int = 32
    top_k: int = 10
    port: int = 18400
    api_key: str | None = None
    workers: int = 4
    device: str = "cpu"

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise TLQError(f"unknown --backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.backend == "transformers" and any("://" in t for t in (self.checkpoint, self.fp)):
            raise TLQError("--backend transformers needs model folders, not URLs")
        if not 1 <= self.top_k <= 20:
            raise TLQError(f"--top-k must be within 1..20 (vLLM's logprob limit), got {self.top_k}")


def _score_endpoint(target: str, port: int, items, cfg: EvalConfig, echo) -> list:
    from serve.client import open_target
    from tlq.evaluate.scorers import EndpointScorer
    with open_target(target, port, cfg.api_key, echo=echo) as endpoint:
        scorer = EndpointScorer(endpoint, cfg.max_new_tokens, cfg.top_k)
        with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
            return list(pool.map(scorer.score, items))


def _score_transformers(items, cfg: EvalConfig, echo):
    """Both models in memory, so the KL is exact and no distribution is stored."""
    from tlq.evaluate.scorers import TransformersScorer
    fp = TransformersScorer.from_folder(Path(cfg.fp), cfg.max_new_tokens, cfg.device)
    quant = TransformersScorer.from_folder(Path(cfg.checkpoint), cfg.max_new_tokens, cfg.device)
    fp_out, q_out, kls = [], [], []
    for i, item in enumerate(items, 1):
        a, b = fp.score(item), quant.score(item)
        kls.append(mean_kl(a.positions, b.positions))
        a.positions = b.positions = []
        fp_out.append(a)
        q_out.append(b)
        if i % 10 == 0:
            echo(f"  {i}/{len(items)} questions")
    return fp_out, q_out, kls


def evaluate(cfg: EvalConfig, echo=print) -> dict:
    """Score both models on every question; returns {"samples": [...], "table": [...], ...}."""
    from tlq.evaluate.data import load_questions
    cfg.validate()
    items = load_questions(cfg.data, cfg.max_samples)
    echo(f"eval: {len(items)} questions from {cfg.data or 'the bundled calibration set'} "
         f"({cfg.backend} backend)")
    if cfg.backend == "endpoint":
        fp_out = _score_endpoint(cfg.fp, cfg.port + 1, items, cfg, echo)
        q_out = _score_endpoint(cfg.checkpoint, cfg.port, items, cfg, echo)
        kls = [mean_kl(a.positions, b.positions) for a, b in zip(fp_out, q_out)]
    else:
        fp_out, q_out, kls = _score_transformers(items, cfg, echo)
    rows = [{"id": it.id, "question_type": it.question_type, "reference": it.reference,
             "answer_fp": a.answer, "answer_quant": b.answer,
             "em_fp": exact_match(a.answer, it.reference), "em_quant": exact_match(b.answer, it.reference),
             "agree": normalize_answer(a.answer) == normalize_answer(b.answer), "kl": kl}
            for it, a, b, kl in zip(items, fp_out, q_out, kls)]
    return {"checkpoint": cfg.checkpoint, "fp": cfg.fp, "backend": cfg.backend,
            "kl": "exact" if cfg.backend == "transformers" else f"top-{cfg.top_k} estimate",
            "table": aggregate(rows), "samples": rows}


def print_table(result: dict) -> None:
    from rich.table import Table

    from tlq.bench.report import console

    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    table = Table(title=f"tlq eval ({result['backend']}): {Path(result['checkpoint']).name} vs "
                        f"{Path(result['fp']).name}; KL(fp || quant) per answer token, {result['kl']}")
    for col in ("question type", "n", "EM fp %", "EM quant %", "recovery %", "agreement %", "KL mean"):
        table.add_column(col, justify="right")
    rows = result["table"]
    for i, row in enumerate(rows):
        table.add_row(row["question_type"], str(row["n"]), fmt(row["em_fp"]), fmt(row["em_quant"]),
                      fmt(row["recovery"]), fmt(row["agreement"]), fmt(row["kl_mean"], ".4g"),
                      end_section=i == len(rows) - 2)  # a rule above the "all" row
    console().print(table)


__all__ = ["BACKENDS", "EvalConfig", "evaluate", "print_table"]
