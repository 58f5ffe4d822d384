"""`tlq eval`: metrics, the recovery table, question loading, and the transformers backend end to end."""
from __future__ import annotations

import math

import pytest
import torch

from tlq.errors import TLQError
from tlq.evaluate import EvalConfig, evaluate
from tlq.evaluate.data import load_questions
from tlq.evaluate.metrics import aggregate, exact_match, mean_kl, normalize_answer, topk_kl


def test_exact_match_normalisation():
    assert normalize_answer("  Top   RIGHT. ") == "top right"
    assert exact_match("the circle is blue", "The circle is blue.")
    assert not exact_match("The circle is red.", "The circle is blue.")
    # articles stay: the glyph answer "A" is not the empty string, so an empty or "the" reply is wrong
    assert normalize_answer("A") == "a" and not exact_match("", "A") and not exact_match("the", "A")
    assert not exact_match("top-right", "top right") and exact_match("K.", "k")


def test_quality_benchmark_scores_with_the_same_rule():
    """benchmarks/quality_lib/evaluate.py has no scorer of its own (issue 15, item 7)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.quality_lib import evaluate as quality_eval
    assert quality_eval.exact_match is exact_match and not hasattr(quality_eval, "normalize")


def _logp(probs):
    return {i: math.log(p) for i, p in enumerate(probs) if p > 0}


def test_topk_kl_is_exact_when_the_lists_cover_everything():
    p, q = [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]
    exact = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert topk_kl(_logp(p), _logp(q)) == pytest.approx(exact)
    assert topk_kl(_logp(p), _logp(p)) == pytest.approx(0.0, abs=1e-12)


def test_topk_kl_with_truncated_lists():
    p = {0: math.log(0.6), 1: math.log(0.2)}  # top-2 of a larger vocabulary
    q = {0: math.log(0.5), 2: math.log(0.3)}  # token 1 is outside q's list: bounded by q's smallest entry
    kl = topk_kl(p, q)
    expected = 0.6 * math.log(0.6 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.2 * math.log(0.2 / 0.2)
    assert kl == pytest.approx(max(expected, 0.0))
    assert math.isnan(topk_kl({}, q))


def test_mean_kl_on_full_vectors_matches_torch():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 11), -1)
    q = torch.log_softmax(torch.randn(3, 11), -1)
    ref = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
    assert mean_kl(list(p), list(q)) == pytest.approx(float(ref), rel=1e-5)
    assert mean_kl([], []) is None


def test_recovery_table_by_question_type():
    keys = ("question_type", "em_fp", "em_quant", "agree", "kl")
    rows = [dict(zip(keys, r)) for r in (("color", True, True, True, 0.1), ("color", True, False, False, 0.3),
                                         ("ocr", False, False, True, None), (None, True, True, True, float("nan")))]
    table = {r["question_type"]: r for r in aggregate(rows)}
    assert list(table) == ["color", "ocr", "untyped", "all"]
    assert table["color"]["recovery"] == 50.0 and table["color"]["kl_mean"] == pytest.approx(0.2)
    assert table["ocr"]["recovery"] is None and table["ocr"]["kl_mean"] is None
    assert table["all"]["n"] == 4 and table["all"]["em_fp"] == 75.0 and table["all"]["recovery"] == pytest.approx(66.67)


def test_questions_become_openai_messages(bundled_calib):
    items = load_questions(bundled_calib)
    image_item = next(i for i in items if i.sample.image_paths)
    msgs = image_item.openai_messages()
    assert msgs[-1]["role"] == "user"
    urls = [p["image_url"]["url"] for m in msgs if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]
    assert len(urls) == len(image_item.sample.image_paths) and urls[0].startswith("data:image/png;base64,")
    full = image_item.openai_messages(with_answer=True)
    assert full[-1]["role"] == "assistant" and len(full) == len(msgs) + 1
    assert image_item.reference and image_item.question_type


def test_config_validation():
    with pytest.raises(TLQError, match="backend"):
        EvalConfig("a", "b", backend="magic").validate()
    with pytest.raises(TLQError, match="folders"):
        EvalConfig("http://127.0.0.1:1/v1", "b", backend="transformers").validate()
    with pytest.raises(TLQError, match="top-k"):
        EvalConfig("a", "b", top_k=50).validate()


@pytest.fixture(scope="module")
def rtn_w3_ckpt(qwen2_vl_dir, tmp_path_factory):
    from tlq import calibrate
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme
    out = tmp_path_factory.mktemp("eval") / "tiny-rtn-w3"
    return calibrate(CalibConfig(model=qwen2_vl_dir, out=out, method=get_method("rtn"),
                                 scheme=get_scheme("w3a16")), progress=False)


def test_transformers_backend_end_to_end(rtn_w3_ckpt, qwen2_vl_dir, bundled_calib):
    quiet = lambda *_: None
    same = evaluate(EvalConfig(str(qwen2_vl_dir), str(qwen2_vl_dir), backend="transformers", max_samples=4,
                               max_new_tokens=4), echo=quiet)
    assert same["table"][-1]["agreement"] == 100.0 and same["table"][-1]["kl_mean"] == pytest.approx(0, abs=1e-9)
    res = evaluate(EvalConfig(str(rtn_w3_ckpt), str(qwen2_vl_dir), backend="transformers", max_samples=4,
                              max_new_tokens=4), echo=quiet)
    assert res["kl"] == "exact" and len(res["samples"]) == 4
    assert res["table"][-1]["question_type"] == "all"
    assert all(s["kl"] > 0 for s in res["samples"])  # 3-bit RTN moves every answer distribution
