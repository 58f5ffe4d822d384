"""Metric, runner and report code of benchmarks/quality.py, on tiny untrained models."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.fixtures import tasks
from benchmarks.quality_lib import evaluate, grid, report
from benchmarks.quality_lib.runner import RunLog, RunOptions, run_cell
from tlq.evaluate.metrics import exact_match


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality-data")
    return tasks.write_eval_data(out, tasks.TaskConfig(n_test=16, n_val=4, n_calib_pool=12))


@pytest.fixture()
def loaded(tiny_model_dir, split):
    model, processor = evaluate.load_for_eval(tiny_model_dir, quantized=False)
    return model, evaluate.build_eval_set(processor, split["test"], batch_size=4)


def _free_greedy(model, evalset, item, k=0):
    """Plain greedy decoding from the prompt plus k reference tokens, decoded up to EOS."""
    cut = item.span[0] + k
    inputs = {key: (v[:, :cut] if key in evaluate.TOKEN_KEYS else v) for key, v in item.encoded.items()
              if key != "labels"}
    out = model.generate(**inputs, max_new_tokens=item.span[1] - item.span[0] - k + 4, do_sample=False,
                         eos_token_id=evalset.eos_id, pad_token_id=evalset.pad_id)[0, cut:].tolist()
    out = out[:out.index(evalset.eos_id)] if evalset.eos_id in out else out
    return evalset.tokenizer.decode(item.targets[:k].tolist() + out, skip_special_tokens=True)


def test_batched_answer_logprobs_match_single_forwards(loaded):
    model, evalset = loaded
    batch = next(b for b in evalset.batches if len(b) > 1)
    lps = evaluate._answer_logprobs(model, evalset, batch)
    for i, lp in zip(batch, lps):
        item = evalset.items[i]
        inputs = {k: v for k, v in item.encoded.items() if k != "labels"}
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        start, end = item.span
        assert lp.shape == (end - start, logits.shape[-1])
        torch.testing.assert_close(lp, torch.log_softmax(logits[start - 1:end - 1], -1), atol=2e-4, rtol=1e-4)


def test_predictions_are_free_greedy_decoding_and_fp_kl_is_zero(loaded):
    model, evalset = loaded
    results, reference = evaluate.run_eval(model, evalset)
    assert "kl_sum" not in results[0]
    for item, res in zip(evalset.items, results):
        assert res["prediction"] == _free_greedy(model, evalset, item)
        assert res["correct"] == exact_match(res["prediction"], item.answer)
    item = next(it for it in evalset.items if len(it.targets) > 1)
    assert evaluate._greedy_from(model, evalset, item, 1) == _free_greedy(model, evalset, item, 1)
    again, _ = evaluate.run_eval(model, evalset, reference)
    assert all(r["kl_sum"] == 0.0 for r in again)
    with torch.no_grad():
        layer = model.model.language_model.layers[0].mlp.down_proj
        layer.weight.add_(torch.randn_like(layer.weight) * layer.weight.std())
    noisy = evaluate.summarize(evaluate.run_eval(model, evalset, reference)[0])
    assert noisy["all"]["kl"] > 0 and math.isfinite(noisy["all"]["kl"])
    assert set(noisy) >= {"all", "needs_image", "text_only", *tasks.TYPE_CYCLE}


def test_summarize_accuracy_and_token_weighted_kl():
    rows = [{"type": "count", "needs_image": True, "correct": True, "n_tokens": 2, "kl_sum": 0.2},
            {"type": "count", "needs_image": True, "correct": False, "n_tokens": 2, "kl_sum": 0.6},
            {"type": "add", "needs_image": False, "correct": True, "n_tokens": 4, "kl_sum": 0.4}]
    s = evaluate.summarize(rows)
    assert s["count"]["accuracy"] == 50.0 and s["add"]["accuracy"] == 100.0
    assert s["all"]["accuracy"] == pytest.approx(200 / 3)
    assert s["needs_image"]["kl"] == pytest.approx(0.2) and s["all"]["kl"] == pytest.approx(0.15)


def test_run_cell_w4a8_adds_activation_quantization_and_resumes(qwen2_vl_dir, split, tmp_path):
    model, processor = evaluate.load_for_eval(qwen2_vl_dir, quantized=False)
    evalset = evaluate.build_eval_set(processor, split["test"], limit=6)
    _, reference = evaluate.run_eval(model, evalset)
    log = RunLog(tmp_path / "results.jsonl")
    opts = RunOptions(calib_samples=4, test_limit=6, seeds=(0,))
    rec = run_cell("tiny", qwen2_vl_dir, grid.SETTINGS["w4a8"], "rtn", 0, opts, split["calib"], tmp_path,
                   evalset, reference, log)
    assert rec["summary"]["all"]["n"] == 6 and rec["summary"]["all"]["kl"] > 0
    assert not any(p.name.startswith("ckpt-") for p in tmp_path.iterdir())  # checkpoints are removed
    again = RunLog(tmp_path / "results.jsonl")
    assert run_cell("tiny", qwen2_vl_dir, grid.SETTINGS["w4a8"], "rtn", 0, opts, split["calib"], tmp_path,
                    evalset, reference, again) == rec and len(again.records) == 1
    assert rec["grid"] == "full"  # rtn rounds on IST-DASLab's symmetric grid
    stale = RunLog(tmp_path / "stale.jsonl")  # a record written before methods had their own grid
    stale.add({k: v for k, v in rec.items() if k != "grid"})
    run_cell("tiny", qwen2_vl_dir, grid.SETTINGS["w4a8"], "rtn", 0, opts, split["calib"], tmp_path, evalset,
             reference, stale)
    assert len(stale.records) == 2 and stale.records[-1]["grid"] == "full"
    from tlq import calibrate
    from tlq.calib.config import CalibConfig
    ckpt = calibrate(CalibConfig(model=qwen2_vl_dir, out=tmp_path / "ck", method=grid.method_spec("rtn"),
                                 scheme=grid.SETTINGS["w4a8"].scheme), progress=False)
    quantized, _ = evaluate.load_for_eval(ckpt, quantized=True)
    q_proj = quantized.model.language_model.layers[0].self_attn.q_proj
    assert len(q_proj._forward_pre_hooks) == 1 and quantized.dtype == torch.float32


def test_grid_ablations_change_one_axis_and_smoothquant_is_w4a8_only():
    tlq = grid.method_spec("tlq")
    for name, spec in grid.ABLATIONS.items():
        changed = [f for f in ("importance", "input_scaling", "clip_search", "solver", "exposure")
                   if getattr(spec, f) != getattr(tlq, f)]
        assert len(changed) == 1, name
    assert "smoothquant" not in grid.methods_for(grid.SETTINGS["w3a16"], ["rtn", "smoothquant"])
    assert "smoothquant" in grid.methods_for(grid.SETTINGS["w4a8"], ["rtn", "smoothquant"])
    assert grid.seeds_for("rtn", [0, 1, 2]) == [0] and grid.seeds_for("tlq", [0, 1, 2]) == [0, 1, 2]
    assert grid.SETTINGS["w2a16"].scheme.group_size == 64 and grid.SETTINGS["w4a8"].scheme.group_size == -1


def test_variants_differ_from_their_method_and_build_valid_configs(tmp_path):
    from tlq.calib.config import CalibConfig, ImportanceConfig
    from tlq.schemes import get_scheme
    assert grid.method_config("tlq") == (grid.method_spec("tlq"), {})
    for name, (spec, overrides) in {**grid.VARIANTS, **grid.EQUAL_FOOTING}.items():
        base = grid.method_spec(name.split("-")[0])
        axes = [f for f in ("importance", "input_scaling", "scale_search", "clip_search", "solver", "exposure")
                if getattr(spec, f) != getattr(base, f)]
        assert axes or overrides, name
        overrides = dict(overrides)
        importance = ImportanceConfig(mode=spec.importance, **overrides.pop("importance", {}))
        cfg = CalibConfig(model=tmp_path, out=tmp_path / "o", method=spec, scheme=get_scheme("w4a16"),
                          importance=importance, **overrides)
        assert all(getattr(cfg, k) == v for k, v in overrides.items())


def _summary(acc_img, acc_txt, kl, kl_text=None):
    kl_text = kl if kl_text is None else kl_text
    return {"color": {"accuracy": acc_img}, "add": {"accuracy": acc_txt},
            "needs_image": {"accuracy": acc_img, "kl": kl}, "text_only": {"accuracy": acc_txt, "kl": kl_text},
            "all": {"accuracy": (acc_img + acc_txt) / 2, "kl": (kl + kl_text) / 2}}


def test_report_aggregates_seeds_and_names_the_winner(tmp_path):
    fp = {"m": _summary(80.0, 60.0, 0.0)}
    recs = [{"model": "m", "setting": "W3A16 g128", "method": "tlq", "seed": s, "summary": _summary(a, 60.0, k)}
            for s, (a, k) in enumerate([(70.0, 0.01), (74.0, 0.02)])]
    recs.append({"model": "m", "setting": "W3A16 g128", "method": "gptq", "seed": 0,
                 "summary": _summary(76.0, 60.0, 0.001, 0.099)})
    table = report.aggregate(recs, fp)
    t = table["m"]["W3A16 g128"]["tlq"]
    assert t["avg"][0] == pytest.approx(66.0) and t["avg"][1] == pytest.approx(math.sqrt(2.0))
    assert t["recovery"][0] == pytest.approx(100 * 66 / 70) and t["seeds"] == 2
    wins = report.verdicts(table)
    assert wins[0]["best_baseline_avg"][0] == "gptq" and not wins[0]["wins_avg"] and wins[0]["wins_kl"]
    sens = report.sensitivity_rows({"m": {"w4a16": _summary(80.0, 59.0, 0.001), "w3a16": _summary(74.0, 56.0, 0.01),
                                          "w2a16": _summary(50.0, 40.0, 0.5)}}, fp)
    assert sens[0]["meets_targets"] and sens[0]["drop"]["w4a16"] == pytest.approx(0.5)
    paths = report.write_reports(tmp_path, table, sens, wins, {"calib_samples": 32, "pool_size": 140,
                                                               "seeds": [0, 1], "test_size": 2, "test_image": 1,
                                                               "test_text": 1})
    md = paths["md"].read_text()
    assert "| W3A16 g128 | TLQ (ours) |" in md and "66.0 ± 1.4" in md and "met" in md
    # where each side's KL is: TLQ's seeds' image / text means, then GPTQ's (all on the text-only questions)
    assert "| 15.000 / 15.000 vs 1.000 / 99.000 |" in md
    assert paths["png"].stat().st_size > 1000
