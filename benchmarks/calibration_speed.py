"""Calibration wall time and peak RSS of every method on a mid-size random Qwen2-VL.

    python benchmarks/calibration_speed.py [--samples 64] [--methods rtn,gptq,...] [--lc-python PY]

Model: `tlq fixture qwen2-vl --size medium` (text hidden 1024, intermediate 2816, 8 layers,
16/4 heads; the same shape as ../shared/reference/peer-anchors/build_medium_qwen2vl.py).
Data: the bundled generator at two seeds (64 samples, 30-120 tokens, up to 64 image tokens).
Every method runs in its own process with one intra-op thread; the table prints wall time
and peak RSS as ratios to GPTQ measured in the same run (GPTQ runs first), and each run's wall
time by phase (tlq_report.json), a row as soon as its run ends: a failed run (or llm-compressor
failing) loses no earlier row. With --lc-python (a Python with
llm-compressor installed, see the peer-anchors setup script) llm-compressor's GPTQ W4A16 on the
same model runs as a second reference; otherwise the anchor measured on these machines is shown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# llm-compressor GPTQ W4A16 g128, 64 samples, 1 thread, same model shape, measured on these machines
# (../shared/reference/peer-anchors/README.md).
LC_ANCHOR = {"wall_s": 71.0, "peak_rss_mb": 1718}

RUNNER = r"""
import json, resource, sys, time
t = time.time()
from tlq.calib.config import CalibConfig, get_method
from tlq import calibrate
from tlq.schemes import get_scheme
model, out, method, scheme, calib = sys.argv[1:6]
path = calibrate(CalibConfig(model=model, out=out, method=get_method(method), scheme=get_scheme(scheme),
                             calib=calib, overwrite=True), progress=False)
phases = json.load(open(f"{path}/tlq_report.json")).get("phase_seconds", {})
print("RESULT " + json.dumps({"wall_s": time.time() - t, "phase_seconds": phases,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

METHOD_SCHEMES = {"rtn": "w4a16", "gptq": "w4a16", "awq": "w4a16", "smoothquant": "w4a8",
                  "mbq": "w4a16", "tlq": "w4a16"}


def build_calibration(folder: Path, samples: int) -> Path:
    """`samples` lines drawn from the bundled generator at successive seeds."""
    from tlq.data.make_bundled import write_bundled
    lines, seed = [], 0
    while len(lines) < samples:
        sub = folder / f"seed{seed}"
        path = write_bundled(sub, seed=seed)
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            rec["id"] = f"s{seed}-{rec['id']}"
            rec["images"] = [f"seed{seed}/{p}" for p in rec.get("images", [])]
            lines.append(json.dumps(rec))
        seed += 1
    out = folder / "calib.jsonl"
    out.write_text("\n".join(lines[:samples]) + "\n")
    return out


def run_method(model: Path, out: Path, method: str, calib: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(model), str(out), method, METHOD_SCHEMES[method],
                           str(calib)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def run_llm_compressor(python: str, model: Path, out: Path, samples: int) -> dict:
    script = Path(__file__).resolve().parents[2] / "shared/reference/peer-anchors/lc_quant.py"
    t = time.time()
    proc = subprocess.run([python, str(script), "gptq", str(model), str(out), str(samples)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": time.time() - t, "peak_rss_mb": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHOD_SCHEMES))
    parser.add_argument("--lc-python", default=None, help="python of a venv with llm-compressor")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()
    from tlq.calib.timing import PHASES
    from tlq.fixtures import ensure_fixture
    model = ensure_fixture("qwen2-vl", size="medium", seed=0)
    methods = args.methods.split(",")
    methods.sort(key=lambda m: m != "gptq")  # the baseline first, so every row can print its ratios at once
    results, reference = {}, None
    print(f"model {model.name}, {args.samples} samples, 1 thread per process; each row prints when its run ends")
    columns = [*PHASES, "other"]
    print(f"{'method':<12} {'scheme':<7} {'wall s':>8} {'peak MB':>8} {'wall/gptq':>10} {'rss/gptq':>9}   "
          + "  ".join(f"{c:>12}" for c in columns), flush=True)
    with tempfile.TemporaryDirectory(prefix="tlq-bench-") as tmp:
        calib = build_calibration(Path(tmp) / "data", args.samples)
        for method in methods:
            try:
                r = results[method] = run_method(model, Path(tmp) / method, method, calib)
            except RuntimeError as exc:  # keep the rows measured so far; say which run failed and why
                print(f"{method:<12} FAILED: {str(exc).splitlines()[-1]}", flush=True)
                continue
            base = results.get("gptq")
            ratios = [f"{r[k] / base[k]:.2f}x" if base else "-" for k in ("wall_s", "peak_rss_mb")]
            phases = "  ".join(f"{r['phase_seconds'].get(c, 0.0):>11.1f}s" for c in columns)
            print(f"{method:<12} {METHOD_SCHEMES[method]:<7} {r['wall_s']:8.1f} {r['peak_rss_mb']:8.0f} "
                  f"{ratios[0]:>10} {ratios[1]:>9}   {phases}", flush=True)
        if args.lc_python:
            try:
                reference = run_llm_compressor(args.lc_python, model, Path(tmp) / "lc", args.samples)
            except RuntimeError as exc:
                print(f"llm-compressor FAILED: {str(exc).splitlines()[-1]}", flush=True)
    base = results.get("gptq")
    if base:
        lc = reference or LC_ANCHOR
        label = "llm-compressor GPTQ (measured now)" if reference else "llm-compressor GPTQ anchor (peer-anchors)"
        print(f"\n{label}: {lc['wall_s']:.1f} s; tlq gptq / llm-compressor = {base['wall_s'] / lc['wall_s']:.2f}x wall"
              + (f", {base['peak_rss_mb'] / lc['peak_rss_mb']:.2f}x peak RSS" if lc.get("peak_rss_mb") else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
