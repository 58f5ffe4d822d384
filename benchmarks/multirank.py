"""Layer-sharded calibration with N = 2 ranks against N = 1, on CPU, in one run.

    python benchmarks/multirank.py [--size deep|medium] [--model DIR] [--method tlq]
                                   [--max-samples N] [--json OUT]

Model: the random Qwen2-VL fixture `tlq fixture qwen2-vl OUT --size SIZE` (seed 0, bf16, built
once into the fixture cache, tlq/fixtures), unless --model is given:
  deep (default)    text hidden 1024, intermediate 2816, 16 heads (4 KV), 28 decoder layers
                    (Qwen2-VL-7B's depth), vision tower depth 4 x width 256; 617 MiB of bf16 weights
  medium            the same widths with 8 decoder layers; 187 MiB (quicker: ~4 minutes)
Data: the first 12 samples of the bundled calibration set for deep (744 tokens), all 32 for
medium (1915 tokens), unless --max-samples; N = 1 and N = 2 together take about 9 minutes on
2 idle cores for deep, up to ~15 under load. Both runs go through the CLI (`tlq calibrate`, then
`tlq calibrate --nproc 2`, which starts torchrun with gloo), each process with OMP_NUM_THREADS=1,
so wall times include start-up.

Printed: wall time of each run and their ratio; peak RSS of the single process (ru_maxrss of
the child) and of each rank (ru_maxrss each rank reports at its end, TLQ_DIST_RECORD) and the
largest rank's ratio to N = 1; whether the two checkpoints hold identical tensors. Targets
(issue 14): per-rank "working memory" at N = 2 at most 0.6 of N = 1 (each process's peak RSS minus
its RSS when calibration starts: interpreter, torch and tlq imported, nothing read yet, a baseline
that on a GPU would not be on the card; transformers' model code, imported later, stays in the
working memory), wall time at most 1.15x N = 1 (2 cores: this measures overheads, not speed-up).
Printed but not a target: the raw peak-RSS ratio (issue 4's target, out of reach on CPU, where
the runtime alone is ~0.9 GiB per process). The machine's load average is printed before,
between and after: other work running at the same time makes the wall times meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.dry_run import host_peaks_gib

TARGET_MEMORY, TARGET_WALL = 0.6, 1.15
DEFAULT_SAMPLES = {"deep": 12, "medium": 32}

# Runs a command and reports the largest peak RSS of its (waited-for) descendants: torchrun's ranks included.
MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.time()
rc = subprocess.call(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "wall_s": time.time() - t,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measured(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], env=env, capture_output=True, text=True, check=False)
    if "RESULT " not in proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {result['rc']}:\n{proc.stderr[-3000:]}")
    return result


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="deep", choices=list(DEFAULT_SAMPLES), help="Qwen2-VL fixture size")
    ap.add_argument("--model", type=Path, help="model folder (default: the Qwen2-VL fixture of --size)")
    ap.add_argument("--method", default="tlq")
    ap.add_argument("--max-samples", type=int, default=None, help="default: 12 (deep), 32 (medium)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (model, checkpoints)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tlq-multirank-"))
    try:
        return run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    from tlq.multirank.launch import free_port
    from tlq.multirank.writer import tensor_hashes

    model = args.model
    if model is None:
        from tlq.fixtures import ensure_fixture
        model = ensure_fixture("qwen2-vl", seed=0, size=args.size)
    samples = args.max_samples or DEFAULT_SAMPLES[args.size]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(free_port()))
    base = [sys.executable, "-m", "tlq", "calibrate", str(model), "--method", args.method, "--quiet",
            "--max-samples", str(samples)]
    print(f"model {model}, method {args.method}, {samples} samples; load average before: {load()}", flush=True)
    one = measured(base + ["--out", str(work / "n1")], dict(env, TLQ_DIST_RECORD=str(work / "n1-record")))
    single = json.loads((work / "n1-record" / "rank0.json").read_text())
    print(f"N=1: {one['wall_s']:.1f} s, peak {one['peak_rss_mb']:.0f} MiB; load average {load()}", flush=True)
    two = measured(base + ["--out", str(work / "n2"), "--nproc", "2"], dict(env, TLQ_DIST_RECORD=str(work / "ranks")))
    ranks = [json.loads((work / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    identical = tensor_hashes(work / "n1") == tensor_hashes(work / "n2")
    wall_ratio = two["wall_s"] / one["wall_s"]
    mem_ratio = max(r["peak_rss_mb"] for r in ranks) / one["peak_rss_mb"]
    working = [one["peak_rss_mb"] - single["start_rss_mb"]] + [r["peak_rss_mb"] - r["start_rss_mb"] for r in ranks]
    working_ratio = max(working[1:]) / working[0]
    print(f"N=2: {two['wall_s']:.1f} s; load average after: {load()}")
    print()
    row = lambda name, cells: print(f"{name:<28}" + "".join(f"{c:<14}" for c in cells))
    span = lambda r: f"{r['layers'][0]}-{r['layers'][1]}"
    row("", ["N=1", "N=2 rank 0", "N=2 rank 1"])
    row("layers", [span(single)] + [span(r) for r in ranks])
    row("peak RSS (MiB)", [f"{one['peak_rss_mb']:.0f}"] + [f"{r['peak_rss_mb']:.0f}" for r in ranks])
    row("weights read (MiB)", ["all"] + [f"{r['loaded_bytes'] / 2**20:.1f}" for r in ranks])
    row("wall time (s)", [f"{one['wall_s']:.1f}", f"{two['wall_s']:.1f}"])
    dry_args = [a for a in base[4:] if a != "--quiet"]  # after "python -m tlq calibrate"
    dry = [host_peaks_gib(dry_args + ["--out", str(work / "dry"), "--nproc", str(n)]) for n in (1, 2)]
    if None not in dry:
        estimates = dry[0] + dry[1]
        row("dry-run host peak (MiB)", [f"{g * 1024:.0f}" for g in estimates])
        measured_mb = [one["peak_rss_mb"]] + [r["peak_rss_mb"] for r in ranks]
        row("  dry run / measured", [f"{g * 1024 / m:.2f}x" for g, m in zip(estimates, measured_mb)])
    row("RSS at start (MiB)", [f"{single['start_rss_mb']:.0f}"] + [f"{r['start_rss_mb']:.0f}" for r in ranks])
    row("working memory (MiB)", [f"{w:.0f}" for w in working])
    print()
    print(f"wall time N=2 / N=1:                      {wall_ratio:.3f}  (target <= {TARGET_WALL}: "
          f"{'met' if wall_ratio <= TARGET_WALL else 'MISSED'})")
    print(f"largest rank working memory N=2 / N=1:    {working_ratio:.3f}  (target <= {TARGET_MEMORY}: "
          f"{'met' if working_ratio <= TARGET_MEMORY else 'MISSED'}; peak RSS minus the RSS at start)")
    print(f"identical tensors:                        {identical}")
    print(f"not a target: largest rank peak RSS N=2 / N=1: {mem_ratio:.3f} (includes the ~{single['start_rss_mb']:.0f} "
          "MiB runtime every process carries, which a GPU run does not have on the card)")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "samples": samples, "n1": one, "n2": two,
                                         "n1_record": single, "ranks": [{k: r[k] for k in (
            "rank", "layers", "loaded_bytes", "peak_rss_mb", "start_rss_mb")} for r in ranks],
            "wall_ratio": wall_ratio, "memory_ratio": mem_ratio, "working_memory_mb": working,
            "working_memory_ratio": working_ratio, "identical": identical, "time": time.time()}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
