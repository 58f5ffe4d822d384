"""Metrics of one model on the test set: greedy exact match and KL to the float model on answer tokens.

One teacher-forced forward per batch gives both:
  * KL(P_fp || P_q) at every answer position (the answer tokens and the end-of-turn token),
    teacher-forced on the reference answer: the primary metric.
  * greedy exact match: greedy decoding reproduces the reference iff the argmax at every answer
    position is the reference token. Where it departs first (position k), greedy decoding is
    continued with `generate` from the prompt + the k reference tokens it did produce, so the
    prediction string is exactly what free greedy decoding outputs; it is scored with tlq's one
    exact-match rule (tlq.evaluate.metrics.exact_match, shared with `tlq eval` and the lmms-eval task).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.quality_lib.encoding import TOKEN_KEYS, answer_span, collate, homogeneous_batches
from tlq.evaluate.metrics import exact_match


@dataclass
class EvalItem:
    id: str
    question_type: str
    needs_image: bool
    answer: str
    encoded: dict
    span: tuple[int, int]  # [start, end) of the labelled answer tokens

    @property
    def targets(self) -> torch.Tensor:
        return self.encoded["labels"][0, self.span[0]:self.span[1]]


@dataclass
class EvalSet:
    items: list[EvalItem]
    batches: list[list[int]]
    pad_id: int
    eos_id: int
    tokenizer: object = field(repr=False)


def build_eval_set(processor, jsonl: Path, batch_size: int = 16, limit: int | None = None) -> EvalSet:
    """Encode the test JSONL once (tlq's encode_sample); the same encodings serve every model."""
    from tlq.data.calib import load_calibration
    from tlq.data.processing import encode_sample

    samples = load_calibration(jsonl, max_samples=limit)
    items = []
    for s in samples:
        enc = encode_sample(processor, s)
        items.append(EvalItem(s.id, s.question_type or "?", bool(s.image_paths), s.answer, enc,
                              answer_span(enc["labels"][0])))
    tok = processor.tokenizer
    return EvalSet(items, homogeneous_batches([it.needs_image for it in items], batch_size),
                   tok.pad_token_id, tok.eos_token_id, tok)


@torch.no_grad()
def _answer_logprobs(model, evalset: EvalSet, batch: list[int]) -> list[torch.Tensor]:
    items = [evalset.items[i] for i in batch]
    inputs = collate([it.encoded for it in items], evalset.pad_id)
    inputs.pop("labels")
    logits = model(**inputs).logits.float()
    # position p predicts token p + 1
    return [torch.log_softmax(logits[r, it.span[0] - 1: it.span[1] - 1], -1) for r, it in enumerate(items)]


@torch.no_grad()
def _greedy_from(model, evalset: EvalSet, item: EvalItem, k: int) -> str:
    """Greedy continuation after the first k reference answer tokens; the full predicted answer."""
    cut = item.span[0] + k
    inputs = {key: (v[:, :cut] if key in TOKEN_KEYS else v) for key, v in item.encoded.items() if key != "labels"}
    budget = item.span[1] - item.span[0] - k + 4
    out = model.generate(**inputs, max_new_tokens=budget, do_sample=False,
                         eos_token_id=evalset.eos_id, pad_token_id=evalset.pad_id)
    new = out[0, cut:].tolist()
    if evalset.eos_id in new:
        new = new[:new.index(evalset.eos_id)]
    return evalset.tokenizer.decode(item.targets[:k].tolist() + new, skip_special_tokens=True)


def run_eval(model, evalset: EvalSet, reference: list[torch.Tensor] | None = None) -> tuple[list[dict], list]:
    """Per-item results and the model's answer log-probabilities (the reference for other models).

    `reference` holds the float model's log-probabilities; without it the KL is not computed.
    """
    model.eval()
    results: list[dict | None] = [None] * len(evalset.items)
    logprobs: list[torch.Tensor | None] = [None] * len(evalset.items)
    for batch in evalset.batches:
        for i, lp in zip(batch, _answer_logprobs(model, evalset, batch)):
            item = evalset.items[i]
            logprobs[i] = lp
            wrong = (lp.argmax(-1) != item.targets).nonzero().flatten()
            if len(wrong) == 0:
                prediction = item.answer
            else:
                prediction = _greedy_from(model, evalset, item, int(wrong[0]))
            res = {"id": item.id, "type": item.question_type, "needs_image": item.needs_image,
                   "correct": exact_match(prediction, item.answer), "prediction": prediction,
                   "n_tokens": len(item.targets)}
            if reference is not None:
                ref = reference[i]
                res["kl_sum"] = float((ref.exp() * (ref - lp)).sum())
            results[i] = res
    return results, logprobs


def summarize(results: list[dict]) -> dict:
    """Accuracy (%) per question type and per group, and mean KL per answer token per group."""
    groups = defaultdict(list)
    for r in results:
        groups[r["type"]].append(r)
        groups["needs_image" if r["needs_image"] else "text_only"].append(r)
        groups["all"].append(r)
    out = {}
    for name, rs in groups.items():
        entry = {"n": len(rs), "accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs)}
        if all("kl_sum" in r for r in rs):
            entry["kl"] = sum(r["kl_sum"] for r in rs) / sum(r["n_tokens"] for r in rs)
        out[name] = entry
    return out


def load_for_eval(path: Path, quantized: bool):
    """(model in float32, processor): a float folder directly, a TLQ checkpoint via load_dequantized.

    Float32 compute keeps bf16 activation rounding out of the comparison, so the KL measures
    the weights' quantization (the dequantized weights are exact in float32)."""
    if quantized:
        from tlq.format.dequantize import load_dequantized
        model, processor = load_dequantized(path)
        _add_activation_quant(model, path)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto")
        processor = AutoProcessor.from_pretrained(path)
    return model.float().eval(), processor


def _add_activation_quant(model, ckpt: Path) -> None:
    """W4A8: per-token int8 fake quantization of every quantized linear's input, as in calibration."""
    import json

    from tlq.adapters import adapter_for_model_type
    from tlq.calib.layer_solve import add_activation_quant
    config = json.loads((Path(ckpt) / "config.json").read_text())
    if config["quantization_config"].get("act_bits", 16) >= 16:
        return
    adapter = adapter_for_model_type(config["model_type"])
    for layer in adapter.layers(model):
        add_activation_quant(layer, adapter.linear_names())
