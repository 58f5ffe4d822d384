"""Layer-sharded calibration with N = 2 ranks against N = 1, on CPU, in one run.

    python benchmarks/multirank.py [--model DIR] [--method tlq] [--max-samples N] [--json OUT]

Model: `tlq fixture qwen2-vl OUT --size medium` (text hidden 1024, intermediate 2816, 8 layers;
built into a temporary folder unless --model is given). Data: the bundled calibration set.
Both runs go through the CLI (`tlq calibrate`, then `tlq calibrate --nproc 2`, which starts
torchrun with gloo), each rank with OMP_NUM_THREADS=1, so wall times include start-up.

Printed: wall time of each run and their ratio; peak RSS of the single process and of each rank
(ru_maxrss each rank reports at its end, TLQ_DIST_RECORD) and the largest rank's ratio to N = 1;
whether the two checkpoints hold identical tensors. Targets (issue 4): per-rank peak at N = 2 at
most 0.6 of N = 1, wall time at most 1.15x N = 1 (2 cores: this measures overheads, not speed-up).
The machine's load average is printed before and after: other work running at the same time
makes the wall times meaningless.
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

TARGET_MEMORY, TARGET_WALL = 0.6, 1.15

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
    ap.add_argument("--model", type=Path, help="model folder (default: build the medium Qwen2-VL fixture)")
    ap.add_argument("--method", default="tlq")
    ap.add_argument("--max-samples", type=int, default=None)
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
    from tlq.dist.launch import free_port
    from tlq.dist.writer import tensor_hashes

    model = args.model
    if model is None:
        from tlq.fixtures import build_atomically
        model = build_atomically("qwen2-vl", work / "model", seed=0, size="medium")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TLQ_DIST_RECORD=str(work / "ranks"),
               MASTER_PORT=str(free_port()))
    base = [sys.executable, "-m", "tlq", "calibrate", str(model), "--method", args.method, "--quiet"]
    if args.max_samples:
        base += ["--max-samples", str(args.max_samples)]
    print(f"model {model}, method {args.method}; load average before: {load()}", flush=True)
    one = measured(base + ["--out", str(work / "n1")], env)
    print(f"N=1: {one['wall_s']:.1f} s, peak {one['peak_rss_mb']:.0f} MiB; load average {load()}", flush=True)
    two = measured(base + ["--out", str(work / "n2"), "--nproc", "2"], env)
    ranks = [json.loads((work / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    identical = tensor_hashes(work / "n1") == tensor_hashes(work / "n2")
    wall_ratio = two["wall_s"] / one["wall_s"]
    mem_ratio = max(r["peak_rss_mb"] for r in ranks) / one["peak_rss_mb"]
    print(f"N=2: {two['wall_s']:.1f} s; load average after: {load()}")
    print()
    print("                       N=1        N=2 rank 0   N=2 rank 1")
    print(f"layers                 0-7        {ranks[0]['layers'][0]}-{ranks[0]['layers'][1]}"
          f"          {ranks[1]['layers'][0]}-{ranks[1]['layers'][1]}")
    print(f"peak RSS (MiB)         {one['peak_rss_mb']:<10.0f} {ranks[0]['peak_rss_mb']:<12.0f} "
          f"{ranks[1]['peak_rss_mb']:.0f}")
    print(f"weights read (MiB)     -          {ranks[0]['loaded_bytes'] / 2**20:<12.1f} "
          f"{ranks[1]['loaded_bytes'] / 2**20:.1f}")
    print(f"wall time (s)          {one['wall_s']:<10.1f} {two['wall_s']:.1f}")
    print()
    print(f"wall time N=2 / N=1:            {wall_ratio:.3f}  (target <= {TARGET_WALL}: "
          f"{'met' if wall_ratio <= TARGET_WALL else 'MISSED'})")
    print(f"largest rank peak N=2 / N=1:    {mem_ratio:.3f}  (target <= {TARGET_MEMORY}: "
          f"{'met' if mem_ratio <= TARGET_MEMORY else 'MISSED'})")
    print(f"identical tensors:              {identical}")
    if args.json:
        args.json.write_text(json.dumps({"n1": one, "n2": two, "ranks": [{k: r[k] for k in (
            "rank", "layers", "loaded_bytes", "peak_rss_mb")} for r in ranks], "wall_ratio": wall_ratio,
            "memory_ratio": mem_ratio, "identical": identical, "time": time.time()}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
