"""Evaluation with lmms-eval: calibrate each method x scheme, serve it with `tlq serve`'s vLLM server,
score it with real lmms-eval (`--model openai_compatible`), print the papers' table.

    python -m benchmarks.real_models --fixture qwen2-vl llava-onevision --out runs/real-fixtures
    python -m benchmarks.real_models --model /models/Qwen2-VL-7B-Instruct --out runs/real-models
    python -m benchmarks.real_models --model /models/Qwen2-VL-7B-Instruct --methods fp rtn \\
        --schemes w4a16 --limit 8 --out runs/real-smoke          # a few questions per task

Two kinds of model:
  * --fixture: the trained benchmark VLMs (docs/quality.md; trained and cached on first use). Their
    test split becomes a local lmms-eval task (tlq.evaluate.lmms_task, nothing is downloaded),
    calibration draws --calib-samples from their calibration pool.
  * --model: any local float model folder, with lmms-eval's own task names (MMMU, TextVQA,
    ScienceQA, OCRBench by default; lmms-eval downloads those datasets), or --data QA.jsonl for a
    local task from your own questions.

For every cell (the float model once, then method x scheme): calibrate into <out>/ckpt/<cell>
unless that checkpoint exists, start a vLLM server on it (serve.process.ServerProcess), run
`python -m lmms_eval --model openai_compatible` against it, stop the server. On a local task the
FP cell is also scored by `tlq eval` (tlq.evaluate) on the same server and questions, and the
table states whether the two accuracies and the per-question answers agree (`--tlq-eval-check`).
Each finished cell is a line of <out>/results.jsonl (a rerun skips it); <out>/real_models.md
holds the papers' table, also printed: one block per scheme, one row per method (FP first), one
column per task plus the average, in %. With several fixtures, each gets <out>/<fixture>/.
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
from tlq.evaluate.lmms_task import MAX_NEW_TOKENS

METHODS = ["fp", "rtn", "gptq", "awq", "smoothquant", "mbq", "tlq"]
DEFAULT_METHODS = ["fp", "rtn", "gptq", "awq", "mbq", "tlq"]
FIXTURE_METHODS = ["fp", "rtn", "gptq", "tlq"]
DEFAULT_TASKS = "mmmu_val,textvqa_val,scienceqa_img,ocrbench"
LOCAL_TASK = "tlq_qa"  # the task written from --data (or a fixture's test split) by tlq.evaluate.lmms_task
SERVED_NAME = "tlq-eval"  # what lmms-eval sends as the model; one name for every cell
TASK_LABELS = {"mmmu_val": "MMMU", "textvqa_val": "TextVQA", "scienceqa_img": "ScienceQA", "ocrbench": "OCRBench",
               LOCAL_TASK: "local QA (EM)"}
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
        raise TLQError(f"lmms-eval is not installed in {sys.executable}; install TLQ's eval extra "
                       "(pip install -e '.[eval]', or TLQ_EXTRAS=cpu,dev,eval make setup) and rerun")


def lmms_command(tasks: list[str], output: Path, limit: float | None, extra: list[str],
                 include_path: Path | None = None, concurrency: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "openai_compatible",
           "--model_args", f"model_version={SERVED_NAME},num_concurrent={concurrency}", "--tasks", ",".join(tasks),
           "--batch_size", "1", "--output_path", str(output)]
    if include_path is not None:  # a local task: its per-question answers feed the tlq eval check
        cmd += ["--include_path", str(include_path), "--log_samples"]
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
    cmd = lmms_command(tasks, output, args.limit, shlex.split(args.lmms_args), args.task_dir, args.concurrency)
    env = {**os.environ, "OPENAI_API_BASE": base_url, "OPENAI_API_KEY": api_key}
    if args.task_dir is not None and tasks == [LOCAL_TASK]:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # nothing to download: never try
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


def lmms_answers(output: Path, task: str) -> list[str]:
    """lmms-eval's answer to each question of `task` (its --log_samples file), in question order."""
    found = sorted(Path(output).rglob(f"*_samples_{task}.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise TLQError(f"lmms-eval wrote no samples file for {task} under {output}; see lmms_eval.log there")
    rows = [json.loads(ln) for ln in found[-1].read_text().splitlines() if ln.strip()]
    return [str(r["filtered_resps"]).strip() for r in sorted(rows, key=lambda r: r["doc_id"])]


def tlq_eval_check(url: str, api_key: str, output: Path, args) -> dict:
    """`tlq eval` (endpoint backend) on the server lmms-eval just used, on the same questions.

    Both sides score with tlq.evaluate.metrics.exact_match; the check compares the accuracies and
    every answer, so a different prompt, image encoding or generation setting shows up here.
    """
    from tlq.evaluate import EvalConfig, evaluate
    answers = lmms_answers(output, LOCAL_TASK)
    result = evaluate(EvalConfig(url, url, args.data, max_samples=len(answers), api_key=api_key,
                                 max_new_tokens=MAX_NEW_TOKENS, workers=args.concurrency), echo=_say)
    ours = [(s["id"], s["answer_fp"].strip()) for s in result["samples"]]
    differ = [{"id": i, "lmms_eval": a, "tlq_eval": b} for a, (i, b) in zip(answers, ours) if a != b]
    return {"n": len(ours), "accuracy": result["table"][-1]["em_fp"] / 100.0,
            "same_answers": len(ours) - len(differ), "different": differ[:5]}


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
        output = args.out / "lmms" / cell.name
        path, metrics = run_lmms_eval(server.url, api_key, key["tasks"], output, args)
        eval_s = time.time() - t0
        check = None
        if LOCAL_TASK in key["tasks"] and args.tlq_eval_check in ("all", cell.method):
            check = tlq_eval_check(server.url, api_key, output, args)
            _say(f"{cell.name}: tlq eval {100 * check['accuracy']:.1f} % vs lmms-eval "
                 f"{100 * metrics[LOCAL_TASK]['value']:.1f} %, {check['same_answers']}/{check['n']} same answers")
    finally:
        server.stop()
    return {**key, "checkpoint": str(ckpt), "results_file": str(path), "metrics": metrics, "tlq_eval": check,
            "calib_seconds": round(calib_s, 1), "startup_seconds": round(startup, 1),
            "eval_seconds": round(eval_s, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


# -- report ---------------------------------------------------------------------------------------------
def _pct(value: float) -> float:
    return value * 100 if abs(value) <= 1 else value  # fractions become %; raw scores (e.g. MME) stay


def render_table(records: list[dict], schemes: list[str], methods: list[str], tasks: list[str],
                 title: str = "Real-model evaluation") -> str:
    """Markdown: one block per scheme, FP row first, columns = tasks + average; then the tlq eval checks."""
    from tlq.schemes import get_scheme
    by_cell = {(r["method"], r["scheme"]): r for r in records}
    head = "| Method | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg |"
    lines = [f"# {title} (lmms-eval through `tlq serve`)", ""]
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
    for r in records:
        if r.get("tlq_eval") and LOCAL_TASK in r["metrics"]:
            c, name = r["tlq_eval"], Cell(r["method"], r["scheme"]).name
            lines.append(f"Check, {name}: lmms-eval {100 * r['metrics'][LOCAL_TASK]['value']:.1f} %, `tlq eval` "
                         f"{100 * c['accuracy']:.1f} % on the same {c['n']} questions; "
                         f"{c['same_answers']}/{c['n']} answers identical.")
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
    from benchmarks.fixtures.outliers import PRESETS as OUTLIER_PRESETS
    from benchmarks.fixtures.train import ARCHS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="local float model folder")
    which.add_argument("--fixture", nargs="+", choices=ARCHS,
                       help="trained benchmark VLMs (docs/quality.md), evaluated on their test split")
    p.add_argument("--data", type=Path, default=None,
                   help=f"QA JSONL (calibration format) turned into the local lmms-eval task {LOCAL_TASK!r}")
    p.add_argument("--outliers", default="default", choices=list(OUTLIER_PRESETS),
                   help="fixtures: outlier channels as in benchmarks/quality.py (none: the plain trained models)")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration JSONL (default: the bundled set; fixtures: their calibration pool)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="use at most N calibration samples (fixtures: 32 drawn by --seed from the pool)")
    p.add_argument("--calib-device", default=None, help="where layers are calibrated (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="fp serves the float model itself; smoothquant runs only with w4a8 "
                        f"(default: {' '.join(DEFAULT_METHODS)}; fixtures: {' '.join(FIXTURE_METHODS)})")
    p.add_argument("--schemes", nargs="+", default=None,
                   help="tlq.schemes names (default: w3a16 w4a8; fixtures: w4a16)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated lmms-eval task names (default: {DEFAULT_TASKS}; with --data or "
                        f"--fixture: {LOCAL_TASK})")
    p.add_argument("--metric", nargs="*", default=[], metavar="TASK=KEY",
                   help="metric of a task's results to report (default: its first non-stderr metric)")
    p.add_argument("--tlq-eval-check", default="fp", choices=["fp", "all", "none"],
                   help=f"cells of the local task {LOCAL_TASK!r} also scored by `tlq eval` on the same server")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight (lmms-eval's num_concurrent, tlq eval's workers); 1 keeps each "
                        "answer independent of what else the server batches")
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
    fixture = args.fixture is not None
    args.methods = args.methods or (FIXTURE_METHODS if fixture else DEFAULT_METHODS)
    args.schemes = args.schemes or (["w4a16"] if fixture else ["w3a16", "w4a8"])
    for s in args.schemes:
        get_scheme(s)  # unknown names fail here, before any work
    args.metric = _metric_overrides(args.metric)
    local = fixture or args.data is not None
    args.tasks = [t.strip() for t in (args.tasks or (LOCAL_TASK if local else DEFAULT_TASKS)).split(",") if t.strip()]
    if not args.tasks:
        raise TLQError("--tasks is empty; pass lmms-eval task names, e.g. --tasks " + DEFAULT_TASKS)
    if LOCAL_TASK in args.tasks and not local:
        raise TLQError(f"task {LOCAL_TASK!r} is written from your questions: pass --data QA.jsonl")
    if args.data is not None and not args.data.is_file():
        raise TLQError(f"--data {args.data} is not a file; pass a QA JSONL in the calibration format")
    if not fixture and not (args.model / "config.json").is_file():
        raise TLQError(f"--model {args.model} is not a model folder (no config.json); pass the local float model")
    if args.calib_device is None:
        import torch
        args.calib_device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def model_runs(args) -> list[tuple[str, argparse.Namespace]]:
    """(title, arguments of one float model): --model as given, or each fixture in <out>/<fixture>."""
    if args.fixture is None:
        return [(args.model.name, argparse.Namespace(**{**vars(args), "model": args.model.resolve()}))]
    from benchmarks.fixtures import train as training
    from benchmarks.fixtures.outliers import PRESETS as OUTLIER_PRESETS
    from benchmarks.fixtures.outliers import ensure_outlier_model
    from benchmarks.fixtures.tasks import draw_calibration_subset
    runs = []
    for arch in args.fixture:
        cfg = training.default_config(arch)
        data = training.ensure_data(cfg.task)
        model = training.ensure_trained(cfg, log=_say)
        if OUTLIER_PRESETS[args.outliers] is not None:
            model = ensure_outlier_model(model, OUTLIER_PRESETS[args.outliers])
        out = args.out / arch
        model = servable_copy(model, out / "float-model")
        n = args.calib_samples or 32
        out.mkdir(parents=True, exist_ok=True)
        calib = args.calib or draw_calibration_subset(data / "calib.jsonl", out / f"calib-n{n}-seed{args.seed}.jsonl",
                                                      n, args.seed)
        title = f"{arch} fixture (outliers: {args.outliers}), test split"
        runs.append((title, argparse.Namespace(**{**vars(args), "model": model.resolve(), "out": out,
                                                   "data": args.data or data / "test.jsonl", "calib": calib,
                                                   "calib_samples": n})))
    return runs


def servable_copy(model: Path, copy: Path) -> Path:
    """`model`, or a copy in vLLM's weight layout when transformers 5 saved SigLIP without `vision_model.`.

    The trained fixtures are saved by transformers (benchmarks/fixtures/train.py), which drops that
    level of a LLaVA-OneVision vision tower; vLLM refuses such a folder. The tiny fixtures get the
    same renaming when they are built (tlq.fixtures.llava_onevision).
    """
    import shutil

    from safetensors import safe_open

    from tlq.fixtures.llava_onevision import nest_vision_model_keys
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        flat = any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
    if not flat:
        return model
    if not (copy / "config.json").is_file():
        tmp = copy.with_name(f".{copy.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model, tmp)
        nest_vision_model_keys(tmp / "model.safetensors")
        tmp.rename(copy)
    return copy


def run_model(title: str, args) -> list[dict]:
    """Every cell of one float model (finished ones skipped); prints and writes its table."""
    from tlq.evaluate.lmms_task import write_lmms_task
    args.out.mkdir(parents=True, exist_ok=True)
    run_file = args.out / "run.json"  # checkpoints under --out belong to one float model
    if run_file.is_file() and json.loads(run_file.read_text()).get("model") != str(args.model):
        raise TLQError(f"{args.out} holds checkpoints of {json.loads(run_file.read_text())['model']}, "
                       f"not {args.model}; pass another --out")
    write_file_atomic(run_file, json.dumps({"model": str(args.model)}) + "\n")
    args.task_dir = None
    if LOCAL_TASK in args.tasks:
        args.task_dir = write_lmms_task(args.data, args.out / "task", LOCAL_TASK).parent
    log_path = args.out / "results.jsonl"
    records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()] \
        if log_path.is_file() else []
    data = str(args.data.resolve()) if args.task_dir else None
    todo = []
    for cell in plan_cells(args.methods, args.schemes):
        key = {"model": str(args.model), "method": cell.method, "scheme": cell.scheme, "tasks": args.tasks,
               "limit": args.limit, "data": data}
        if any(all(r.get(k) == v for k, v in key.items()) for r in records):
            _say(f"{cell.name}: done earlier, skipped")
        else:
            todo.append((cell, key))
    for cell, key in todo:
        t0 = time.time()
        rec = run_cell(cell, args, key)
        records.append(rec)
        write_file_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        scores = ", ".join(f"{t} {_pct(m['value']):.1f}" for t, m in rec["metrics"].items())
        _say(f"{cell.name}: {scores} ({time.time() - t0:.0f} s)")
    current = [r for r in records if r["model"] == str(args.model) and r["tasks"] == args.tasks
               and r["limit"] == args.limit and r.get("data") == data]
    table = render_table(current, args.schemes, args.methods, args.tasks, title)
    write_file_atomic(args.out / "real_models.md", table)
    print(table, flush=True)
    _say(f"wrote {args.out / 'real_models.md'} and {log_path}")
    return current


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    require_lmms_eval()  # before any calibration or training
    return [rec for title, model_args in model_runs(args) for rec in run_model(title, model_args)]


if __name__ == "__main__":
    try:
        main()
    except TLQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
