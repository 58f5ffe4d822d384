"""Quality benchmark: every method x setting on the trained small VLMs, in the papers' table layout.

    python -m benchmarks.quality --quick            # a few minutes: 1 seed, 2 settings, small test set
    python -m benchmarks.quality --out runs/quality # the full grid (trains the models first if not cached)

For each model (Qwen2-VL, LLaVA-OneVision, trained by benchmarks/fixtures/train.py) x setting
(W3A16 g128, W4A8, W4A16 g128, W2A16 g64) x method (RTN, GPTQ, AWQ, SmoothQuant for W4A8, MBQ,
TLQ and its ablations) x calibration seed: calibrate with tlq.calibrate, load the
checkpoint with tlq.format.dequantize.load_dequantized, and measure KL to FP on answer tokens
(primary) and greedy exact match per question type. Also checks that the fixtures are sensitive
to quantization (RTN g64 at 4/3/2 bits). Writes results.jsonl (resumable), quality.json,
quality.md and quality.png to --out. See docs/quality.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.fixtures import train as training
from benchmarks.fixtures.outliers import PRESETS as OUTLIER_PRESETS
from benchmarks.fixtures.outliers import ensure_outlier_model
from benchmarks.quality_lib import grid, peers, report
from benchmarks.quality_lib.evaluate import build_eval_set, load_for_eval, run_eval, summarize
from benchmarks.quality_lib.runner import RunLog, RunOptions, options_key, run_cell

ALL_METHODS = ["rtn", "gptq", "awq", "smoothquant", "mbq", "tlq"]
QUICK = {"seeds": [0], "settings": ["w3a16", "w4a8"], "test_limit": 84, "ablation_settings": []}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="output folder")
    p.add_argument("--quick", action="store_true", help="few-minute run: " + json.dumps(QUICK))
    p.add_argument("--models", nargs="+", default=list(training.ARCHS), choices=training.ARCHS)
    p.add_argument("--settings", nargs="*", default=None, choices=list(grid.SETTINGS),
                   help="settings to run (none: only the FP and sensitivity evaluation)")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS + list(grid.VARIANTS) + list(grid.EQUAL_FOOTING),
                   help="methods (default: all baselines and tlq); tlq-* variants are candidates for TLQ's "
                        "defaults, to be compared with --split val")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="evaluation split: test (the reported table) or val (for choosing settings)")
    p.add_argument("--ablation-settings", nargs="*", default=None, choices=list(grid.SETTINGS),
                   help="settings that also get the TLQ ablation rows (default: the paper pair w3a16 w4a8)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="calibration seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=1, help="models evaluated in parallel processes (1 thread each)")
    p.add_argument("--calib-samples", type=int, default=32, help="samples drawn from the pool per seed")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N questions of the split")
    p.add_argument("--outliers", default="default", choices=list(OUTLIER_PRESETS),
                   help="outlier channels added to the trained models (exact re-parametrisation, "
                        "benchmarks/fixtures/outliers.py); none: the plain trained models")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the RTN g64 fixture check")
    p.add_argument("--cache", type=Path, default=None, help="trained-model cache root (default $TLQ_CACHE/trained)")
    p.add_argument("--lc-python", type=Path, default=None,
                   help="python of llm-compressor's venv: adds its GPTQ/AWQ/SmoothQuant as peer rows (lc-*) beside "
                        "ours, on the same samples and scorer (benchmarks/quality_lib/peers.py)")
    p.add_argument("--peers", nargs="+", default=None, choices=list(peers.PEERS) + list(peers.VARIANTS),
                   help="peer rows to run with --lc-python (default: lc-gptq lc-awq lc-smoothquant, each where "
                        "our method runs); lc-*-no-* rows change one llm-compressor default to ours")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else {}
    args.seeds = args.seeds or preset.get("seeds", [0, 1, 2])
    args.settings = preset.get("settings", list(grid.SETTINGS)) if args.settings is None else args.settings
    args.methods = args.methods or preset.get("methods", ALL_METHODS)
    args.test_limit = args.test_limit or preset.get("test_limit")
    if args.ablation_settings is None:
        args.ablation_settings = preset.get("ablation_settings", ["w3a16", "w4a8"])
    args.ablation_settings = [s for s in args.ablation_settings if s in args.settings]
    args.mode = "quick" if args.quick else "full"
    if args.lc_python is not None:
        args.lc_python = peers.check_python(args.lc_python)
    return args


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def evaluate_model(arch: str, args, data: Path, opts: RunOptions, log: RunLog):
    """(FP summary, sensitivity summaries, test size, eval set) of one model; grid cells go to `log`."""
    model_dir = training.ensure_trained(training.default_config(arch), args.cache, log=_say)
    if OUTLIER_PRESETS[args.outliers] is not None:
        model_dir = ensure_outlier_model(model_dir, OUTLIER_PRESETS[args.outliers])
    fp_model, processor = load_for_eval(model_dir, quantized=False)
    evalset = build_eval_set(processor, data / f"{opts.split}.jsonl", limit=opts.test_limit)
    fp_results, reference = run_eval(fp_model, evalset)
    fp_summary = summarize(fp_results)
    _say(f"{arch}: FP accuracy {fp_summary['all']['accuracy']:.1f} on {len(evalset.items)} questions")
    del fp_model
    work = args.out / "work" / arch
    work.mkdir(parents=True, exist_ok=True)
    sens = {}
    if not args.no_sensitivity:
        for name, setting in grid.SENSITIVITY.items():
            rec = run_cell(arch, model_dir, setting, "rtn", 0, opts, data / "calib.jsonl", work, evalset, reference, log)
            sens[name] = rec["summary"]
            _say(f"{arch}: sensitivity RTN {setting.label}: acc {rec['summary']['all']['accuracy']:.1f} "
                 f"KL {rec['summary']['all']['kl']:.2e}")
    for setting_name in args.settings:
        setting = grid.SETTINGS[setting_name]
        extra = grid.extra_rows() if setting_name in args.ablation_settings else []
        for method in grid.methods_for(setting, args.methods) + extra:
            for seed in grid.seeds_for(method, list(opts.seeds)):
                rec = run_cell(arch, model_dir, setting, method, seed, opts, data / "calib.jsonl", work, evalset,
                               reference, log)
                s = rec["summary"]["all"]
                _say(f"{arch} {setting.label} {method} seed {seed}: acc {s['accuracy']:.1f} KL {s['kl']:.2e} "
                     f"({rec['calib_seconds']:.0f}s + {rec['eval_seconds']:.0f}s)")
        for peer in peers_of(setting, args):
            for seed in opts.seeds:
                rec = peers.run_peer(arch, model_dir, setting, peer, seed, opts, data / "calib.jsonl", work, evalset,
                                     reference, log, args.lc_python)
                s = rec["summary"]["all"]
                _say(f"{arch} {setting.label} {peer} seed {seed}: acc {s['accuracy']:.1f} KL {s['kl']:.2e} "
                     f"({rec['calib_seconds']:.0f}s + {rec['eval_seconds']:.0f}s)")
    return fp_summary, sens, len(evalset.items), evalset


def peers_of(setting, args) -> list[str]:
    """llm-compressor's rows at `setting` (none without --lc-python)."""
    return [] if args.lc_python is None else peers.peers_for(setting, args.methods, args.peers)


def _outlier_key(args) -> str | None:
    cfg = OUTLIER_PRESETS[args.outliers]
    return None if cfg is None else cfg.key


def run_model(arch: str, args) -> dict:
    """Everything for one model (a worker process with --jobs > 1); returns what the report needs."""
    torch.set_num_threads(1)
    opts = RunOptions(calib_samples=args.calib_samples, test_limit=args.test_limit, seeds=tuple(args.seeds),
                      split=args.split, outliers=_outlier_key(args))
    data = training.ensure_data(training.default_config(arch).task, args.cache)
    log = RunLog(args.out / f"results-{arch}.jsonl")
    fp, sens, n, evalset = evaluate_model(arch, args, data, opts, log)
    wanted = {(arch, grid.SETTINGS[s].label, m, seed) for s in args.settings
              for m in grid.methods_for(grid.SETTINGS[s], args.methods) for seed in grid.seeds_for(m, args.seeds)}
    wanted |= {(arch, grid.SETTINGS[s].label, m, seed) for s in args.ablation_settings
               for m in grid.extra_rows() for seed in args.seeds}
    wanted |= {(arch, grid.SETTINGS[s].label, m, seed) for s in args.settings
               for m in peers_of(grid.SETTINGS[s], args) for seed in args.seeds}
    # the last record of each cell (a cell re-run after a numerics change appends a new one)
    latest = {(r["model"], r["setting"], r["method"], r["seed"]): r for r in log.records
              if r["options"] == options_key(opts)}
    records = [r for cell, r in latest.items() if cell in wanted]
    return {"arch": arch, "fp": fp, "sens": sens, "records": records, "pool": data / "calib.jsonl",
            "sizes": {"test_size": n, "test_image": sum(it.needs_image for it in evalset.items),
                      "test_text": sum(not it.needs_image for it in evalset.items)}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and len(args.models) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(args.models))) as pool:
            outputs = pool.starmap(run_model, [(arch, args) for arch in args.models])
    else:
        outputs = [run_model(arch, args) for arch in args.models]
    fp = {o["arch"]: o["fp"] for o in outputs}
    sens = {o["arch"]: o["sens"] for o in outputs if o["sens"]}
    table = report.aggregate([r for o in outputs for r in o["records"]], fp)
    pool_file = outputs[0]["pool"]
    meta = {"mode": args.mode, "split": args.split, "outliers": _outlier_key(args), "calib_samples": args.calib_samples, "seeds": list(args.seeds),
            "pool_size": sum(1 for ln in pool_file.read_text().splitlines() if ln.strip()),
            "settings": args.settings, "methods": args.methods, "ablation_settings": args.ablation_settings,
            "peers": args.lc_python is not None,
            "minutes": round((time.time() - t0) / 60, 1), "jobs": args.jobs, "torch_threads": 1,
            "cell_minutes": round(sum(r["calib_seconds"] + r["eval_seconds"] for o in outputs for r in o["records"])
                                  / 60, 1),
            **outputs[0]["sizes"]}
    paths = report.write_reports(args.out, table, report.sensitivity_rows(sens, fp), report.verdicts(table), meta,
                                 report.peer_rows(table))
    _say(f"done in {meta['minutes']} min: " + ", ".join(str(p) for p in paths.values()))
    return {"table": table, "paths": paths}


if __name__ == "__main__":
    main()
