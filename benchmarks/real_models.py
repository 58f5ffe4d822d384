"""Real-model evaluation: calibrate each method x scheme, serve it with vLLM, score it with lmms-eval.

    python -m benchmarks.real_models --model /models/Qwen2-VL-7B-Instruct --out runs/real-models
    python -m benchmarks.real_models --model /models/Qwen2-VL-7B-Instruct --methods fp rtn \\
        --schemes w4a16 --limit 8 --out runs/real-smoke          # a few questions per task

For every cell (the float model once, then method x scheme): calibrate into <out>/ckpt/<cell>
unless that checkpoint exists, start a vLLM server on it (serve.process.ServerProcess), run
`python -m lmms_eval --model openai_compatible` against it, stop the server. Each finished cell
is a line of <out>/results.jsonl (a rerun skips it); <out>/real_models.md holds the papers'
table: one block per scheme, one row per method (FP first), one column per task plus the
average, in %. lmms-eval downloads its datasets from the Hugging Face hub on first use; see
docs/quality.md, "Real models".
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlq.atomic import write_file_atomic
from tlq.errors import TLQError

METHODS = ["fp", "rtn", "gptq", "awq", "smoothquant", "mbq", "tlq"]
DEFAULT_METHODS = ["fp", "rtn", "gptq", "awq", "mbq", "tlq"]
DEFAULT_TASKS = "mmmu_val,textvqa_val,scienceqa_img,ocrbench"
SERVED_NAME = "tlq-eval"  # what lmms-eval sends as the model; one name for every cell
TASK_LABELS = {"mmmu_val": "MMMU", "textvqa_val": "TextVQA", "scienceqa_img": "ScienceQA", "ocrbench": "OCRBench"}
METHOD_LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant",
                 "mbq": "MBQ", "tlq": "TLQ"}


@dataclass(frozen=True)
class Cell:
    """One row of the table in one scheme block; scheme None is the float model (served as is)."""

    method: str
    scheme: str | None

    @property
    def name(self) -> str:
        return "fp" if self.scheme is None else f"{self.method}-{self.scheme}"


def plan_cells(methods: list[str], schemes: list[str]) -> list[Cell]:
    """FP once, then every method x scheme; SmoothQuant only where activations are quantized."""
    from benchmarks.quality_lib.grid import make_setting, methods_for
    cells = [Cell("fp", None)] if "fp" in methods else []
    for scheme in schemes:
        cells += [Cell(m, scheme) for m in methods_for(make_setting(scheme, None), methods) if m != "fp"]
    return cells


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- lmms-eval ---------------------------------------------------------------------------------------
def require_lmms_eval() -> None:
    if find_spec("lmms_eval") is None:
        raise TLQError(f"lmms-eval is not installed in {sys.executable}; run `pip install lmms-eval` "
                       "(or put it on PYTHONPATH) and rerun")


def lmms_command(tasks: list[str], output: Path, limit: float | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "openai_compatible",
           "--model_args", f"model_version={SERVED_NAME}", "--tasks", ",".join(tasks),
           "--batch_size", "1", "--output_path", str(output)]
    if limit is not None:
        cmd += ["--limit", f"{limit:g}"]
    return cmd + list(extra)


def newest_results_file(output: Path, since: float = 0.0) -> Path:
    """lmms-eval writes <output_path>/<sanitized model name>/<date>_results.json; take the newest."""
    found = [p for p in Path(output).rglob("*_results.json") if p.is_file() and p.stat().st_mtime >= since]
    if not found:
        raise TLQError(f"lmms-eval wrote no *_results.json under {output}; see its log there, "
                       "check --tasks with `python -m lmms_eval --tasks list`, and rerun")
    return max(found, key=lambda p: p.stat().st_mtime)


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_results(path: Path, tasks: list[str], overrides: dict[str, str] | None = None) -> dict[str, dict]:
    """{task: {"metric": key, "value": v}}: the override, else the task's first numeric non-stderr metric."""
    overrides = overrides or {}
    try:
        data = json.loads(Path(path).read_text())
        sections = [data.get("results") or {}, data.get("groups") or {}]
    except (OSError, ValueError, AttributeError) as exc:
        raise TLQError(f"cannot read lmms-eval results {path} ({exc}); delete it and rerun the cell") from None
    metrics = {}
    for task in tasks:
        entry = next((s[task] for s in sections if isinstance(s.get(task), dict)), None)
        if entry is None:
            raise TLQError(f"{path} has no results for task {task!r}; check the task name with "
                           "`python -m lmms_eval --tasks list`")
        wanted = overrides.get(task)
        keys = [k for k, v in entry.items() if _numeric(v) and "stderr" not in k and k != "alias"]
        if wanted is not None:
            keys = [k for k in keys if k == wanted or k.split(",")[0] == wanted]
        if not keys:
            what = f"metric {wanted!r}" if wanted else "numeric metric"
            raise TLQError(f"task {task!r} in {path} has no {what} (keys: {', '.join(entry)}); "
                           "pass --metric task=<metric key>")
        metrics[task] = {"metric": keys[0], "value": float(entry[keys[0]])}
    return metrics


def run_lmms_eval(base_url: str, api_key: str, tasks: list[str], output: Path, args) -> tuple[Path, dict]:
    output.mkdir(parents=True, exist_ok=True)
    cmd = lmms_command(tasks, output, args.limit, shlex.split(args.lmms_args))
    env = {**os.environ, "OPENAI_API_BASE": base_url, "OPENAI_API_KEY": api_key}
    log = output / "lmms_eval.log"
    t0 = time.time() - 1  # mtime granularity: the results file must be newer than this run's start
    _say(f"lmms-eval: {shlex.join(cmd)} (log {log})")
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                            check=False).returncode
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise TLQError(f"lmms-eval exited with code {rc}: {lines[-1][-300:] if lines else 'no output'}; "
                       f"full log: {log}")
    path = newest_results_file(output, since=t0)
    return path, parse_results(path, tasks, args.metric)


# -- cells ----------------------------------------------------------------------------------------------
def ensure_checkpoint(cell: Cell, args) -> tuple[Path, float]:
    """(folder to serve, calibration seconds); checkpoints are written atomically, so existing = complete."""
    if cell.scheme is None:
        return args.model, 0.0
    ckpt = args.out / "ckpt" / cell.name
    if (ckpt / "config.json").is_file():
        _say(f"{cell.name}: reusing checkpoint {ckpt}")
        return ckpt, 0.0
    from tlq import calibrate
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme
    _say(f"{cell.name}: calibrating into {ckpt}")
    t0 = time.time()
    calibrate(CalibConfig(model=args.model, out=ckpt, method=get_method(cell.method),
                          scheme=get_scheme(cell.scheme), calib=args.calib, max_samples=args.calib_samples,
                          seed=args.seed, device=args.calib_device, overwrite=True), progress=False)
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the vLLM server started next
    return ckpt, time.time() - t0


def run_cell(cell: Cell, args, key: dict) -> dict:
    from serve.config import ServeConfig
    from serve.process import ServerProcess
    ckpt, calib_s = ensure_checkpoint(cell, args)
    api_key = secrets.token_hex(16)
    cfg = ServeConfig(model=ckpt, port=args.port, tp=args.tp, api_key=api_key, served_model_name=SERVED_NAME,
                      max_model_len=args.max_model_len, images_per_prompt=args.images_per_prompt,
                      startup_timeout=args.startup_timeout)
    _say(f"{cell.name}: starting vLLM on {ckpt} (port {args.port})")
    server = ServerProcess(cfg)
    try:
        server.start()
        startup = server.wait_ready()
        _say(f"{cell.name}: server ready after {startup:.0f} s")
        t0 = time.time()
        path, metrics = run_lmms_eval(server.url, api_key, key["tasks"], args.out / "lmms" / cell.name, args)
    finally:
        server.stop()
    return {**key, "checkpoint": str(ckpt), "results_file": str(path), "metrics": metrics,
            "calib_seconds": round(calib_s, 1), "startup_seconds": round(startup, 1),
            "eval_seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


# -- report ---------------------------------------------------------------------------------------------
def _pct(value: float) -> float:
    return value * 100 if abs(value) <= 1 else value  # fractions become %; raw scores (e.g. MME) stay


def render_table(records: list[dict], schemes: list[str], methods: list[str], tasks: list[str]) -> str:
    """Markdown: one block per scheme, FP row first, columns = tasks + average."""
    from tlq.schemes import get_scheme
    by_cell = {(r["method"], r["scheme"]): r for r in records}
    head = "| Method | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg |"
    lines = ["# Real-model evaluation (lmms-eval through `tlq serve`)", ""]
    for scheme in schemes:
        lines += [f"## {get_scheme(scheme).describe()}", "", head, "|" + " --- |" * (len(tasks) + 2)]
        for cell in plan_cells(methods, [scheme]):
            rec = by_cell.get((cell.method, cell.scheme))
            vals = [_pct(rec["metrics"][t]["value"]) if rec and t in rec["metrics"] else None for t in tasks]
            shown = ["-" if v is None else f"{v:.1f}" for v in vals]
            avg = "-" if None in vals or not vals else f"{sum(vals) / len(vals):.1f}"
            lines.append(f"| {METHOD_LABELS.get(cell.method, cell.method)} | " + " | ".join(shown) + f" | {avg} |")
        lines.append("")
    metric_names = sorted({f"{t}: {m['metric']}" for r in records for t, m in r["metrics"].items() if t in tasks})
    lines += ["Metrics: " + "; ".join(metric_names) + ". Values in [0, 1] are shown x100."] if metric_names else []
    return "\n".join(lines) + "\n"


# -- CLI ------------------------------------------------------------------------------------------------
def _metric_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise TLQError(f"--metric {item!r} is not task=metric_key, e.g. --metric ocrbench=ocrbench_accuracy")
        out[task] = metric
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="local float model folder")
    p.add_argument("--calib", type=Path, default=None, help="calibration JSONL (default: the bundled set)")
    p.add_argument("--calib-samples", type=int, default=None, help="use at most N calibration samples")
    p.add_argument("--calib-device", default=None, help="where layers are calibrated (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS,
                   help="fp serves the float model itself; smoothquant runs only with w4a8")
    p.add_argument("--schemes", nargs="+", default=["w3a16", "w4a8"], help="tlq.schemes names")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lmms-eval task names")
    p.add_argument("--metric", nargs="*", default=[], metavar="TASK=KEY",
                   help="metric of a task's results to report (default: its first non-stderr metric)")
    p.add_argument("--out", type=Path, default=Path("runs/real-models"), help="output folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the server")
    p.add_argument("--port", type=int, default=18000, help="port of the server (one cell at a time)")
    p.add_argument("--max-model-len", type=int, default=None, help="server context length (default: model's, capped)")
    p.add_argument("--images-per-prompt", type=int, default=None,
                   help="images per request the server accepts (default 1; MMMU has multi-image questions)")
    p.add_argument("--startup-timeout", type=float, default=1200.0, help="seconds to wait for the server")
    p.add_argument("--limit", type=float, default=None, help="lmms-eval --limit: questions per task (smoke runs)")
    p.add_argument("--lmms-args", default="", help="extra lmms-eval arguments, e.g. --lmms-args='--log_samples'")
    args = p.parse_args(argv)
    from tlq.schemes import get_scheme
    for s in args.schemes:
        get_scheme(s)  # unknown names fail here, before any work
    args.metric = _metric_overrides(args.metric)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        raise TLQError("--tasks is empty; pass lmms-eval task names, e.g. --tasks " + DEFAULT_TASKS)
    if not (args.model / "config.json").is_file():
        raise TLQError(f"--model {args.model} is not a model folder (no config.json); pass the local float model")
    args.model = args.model.resolve()
    if args.calib_device is None:
        import torch
        args.calib_device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run_file = args.out / "run.json"  # checkpoints under --out belong to one float model
    if run_file.is_file() and json.loads(run_file.read_text()).get("model") != str(args.model):
        raise TLQError(f"{args.out} holds checkpoints of {json.loads(run_file.read_text())['model']}, "
                       f"not {args.model}; pass another --out")
    write_file_atomic(run_file, json.dumps({"model": str(args.model)}) + "\n")
    log_path = args.out / "results.jsonl"
    records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()] \
        if log_path.is_file() else []
    todo = []
    for cell in plan_cells(args.methods, args.schemes):
        key = {"model": str(args.model), "method": cell.method, "scheme": cell.scheme, "tasks": args.tasks,
               "limit": args.limit}
        if any(all(r.get(k) == v for k, v in key.items()) for r in records):
            _say(f"{cell.name}: done earlier, skipped")
        else:
            todo.append((cell, key))
    if todo:
        require_lmms_eval()
    for cell, key in todo:
        t0 = time.time()
        rec = run_cell(cell, args, key)
        records.append(rec)
        write_file_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        scores = ", ".join(f"{t} {_pct(m['value']):.1f}" for t, m in rec["metrics"].items())
        _say(f"{cell.name}: {scores} ({time.time() - t0:.0f} s)")
    current = [r for r in records if r["model"] == str(args.model) and r["tasks"] == args.tasks
               and r["limit"] == args.limit]
    table = args.out / "real_models.md"
    write_file_atomic(table, render_table(current, args.schemes, args.methods, args.tasks))
    _say(f"wrote {table} and {log_path}")
    return current


if __name__ == "__main__":
    try:
        main()
    except TLQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
