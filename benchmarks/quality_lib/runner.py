"""Run cells of the grid: calibrate one (model, setting, method, seed), evaluate it, record the result.

Results are appended to `results.jsonl` as each cell finishes, so an interrupted run resumes
where it stopped (`RunLog.done`), and a cell's key names everything that decides its result.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fixtures.tasks import draw_calibration_subset
from benchmarks.quality_lib.evaluate import EvalSet, load_for_eval, run_eval, summarize
from benchmarks.quality_lib.grid import Setting, method_config


@dataclass(frozen=True)
class RunOptions:
    """Sizes of one benchmark run.

    Attributes:
        calib_samples: calibration samples drawn from the pool per seed.
        test_limit: evaluate on the first N questions of the split (None = all).
        seeds: calibration seeds (each draws its own subset of the pool).
        split: evaluation split: "test" (the reported tables) or "val" (choosing method settings).
        outliers: key of the fixture's outlier re-parametrisation (benchmarks/fixtures/outliers.py),
            None for the plain trained model.
    """

    calib_samples: int = 32
    test_limit: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    split: str = "test"
    outliers: str | None = None


class RunLog:
    """Append-only JSONL of finished cells."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()] \
            if self.path.is_file() else []

    @staticmethod
    def key(record: dict) -> tuple:
        """A record's identity; "grid" (symmetric settings only) is absent from records written before
        each method had its own symmetric grid, so those are never reused."""
        return (record["model"], record["setting"], record["method"], record["seed"], record["options"],
                record.get("grid"))

    def done(self, key: tuple) -> dict | None:
        return next((r for r in self.records if self.key(r) == key), None)

    def add(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def options_key(opts: RunOptions) -> str:
    plain = f"calib{opts.calib_samples}-{opts.split}{opts.test_limit or 'all'}"
    return plain if opts.outliers is None else f"{plain}-outliers-{opts.outliers}"


def calibration_file(pool: Path, work: Path, n: int, seed: int) -> Path:
    path = work / f"calib-n{n}-seed{seed}.jsonl"
    return path if path.is_file() else draw_calibration_subset(pool, path, n, seed)


def run_cell(model_name: str, model_dir: Path, setting: Setting, method: str, seed: int, opts: RunOptions,
             pool: Path, work: Path, evalset: EvalSet, reference: list, log: RunLog) -> dict:
    """Calibrate, evaluate and record one cell (or return its earlier record)."""
    from tlq import calibrate
    from tlq.calib.config import CalibConfig, ImportanceConfig

    spec, overrides = method_config(method)
    base = {"model": model_name, "setting": setting.label, "method": method, "seed": seed,
            "options": options_key(opts)}
    if setting.scheme.symmetric:  # how the scales were chosen (tlq.quant.qparams.SymmetricGrid)
        base["grid"] = spec.grid.value
    earlier = log.done(RunLog.key(base))
    if earlier is not None:
        return earlier
    overrides = dict(overrides)
    importance = ImportanceConfig(mode=spec.importance, **overrides.pop("importance", {}))
    ckpt = work / f"ckpt-{model_name}-{setting.scheme.name}-g{setting.scheme.group_size}-{method}-s{seed}"
    t0 = time.time()
    cfg = CalibConfig(model=model_dir, out=ckpt, method=spec, scheme=setting.scheme,
                      calib=calibration_file(pool, work, opts.calib_samples, seed), seed=seed, overwrite=True,
                      importance=importance, **overrides)
    calibrate(cfg, progress=False)
    t1 = time.time()
    model, _ = load_for_eval(ckpt, quantized=True)
    results, _ = run_eval(model, evalset, reference)
    record = {**base, "summary": summarize(results), "calib_seconds": round(t1 - t0, 2),
              "eval_seconds": round(time.time() - t1, 2),
              "wrong": [[r["id"], r["prediction"]] for r in results if not r["correct"]][:20]}
    shutil.rmtree(ckpt, ignore_errors=True)
    log.add(record)
    return record
