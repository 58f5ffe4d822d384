#!/usr/bin/env bash
# One short GPU check (issue 14, item 4), under 10 minutes on one GPU:
#   1. `tlq calibrate --device cuda` single-rank on the medium fixture (hidden 1024, 8 layers);
#   2. the same with two ranks (--nproc 2, rank r on cuda:LOCAL_RANK) when torch sees >= 2 GPUs;
# and for each, the measured peak device memory of the layer loop (torch.cuda.max_memory_allocated per
# layer, tlq_report.json) against the `--dry-run` estimate (its "layer work" on the device, and the
# device peak, which also covers the gradient pass).
#
#   benchmarks/gpu_smoke.sh [WORK_DIR]        (PY=path/to/python to pick the interpreter)
#
# Exits 2 with one line when no CUDA device is visible; 1 when a run fails; 0 otherwise (the ratios
# are printed, not judged: the estimate is an upper bound by construction, see tlq/multirank/estimate.py).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${1:-$(mktemp -d -t tlq-gpu-smoke.XXXXXX)}
RUN_LIMIT_S=${RUN_LIMIT_S:-240}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)"; then
    echo "gpu_smoke: no CUDA device visible to torch ($PY: torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print(f'gpu_smoke: torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}')"

mkdir -p "$WORK"
MODEL="$WORK/qwen2-vl-medium"
[ -f "$MODEL/config.json" ] || "$PY" -m tlq fixture qwen2-vl "$MODEL" --size medium

compare() {  # compare NPROC OUT: measured peaks (report) against the dry-run estimate
    "$PY" - "$MODEL" "$2" "$1" <<'EOF'
import json, sys
from pathlib import Path
from tlq.api import make_config
from tlq.multirank.estimate import GIB, estimate_memory
model, out, nproc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
est = estimate_memory(make_config(model, out, device="cuda"), nproc)
report = json.loads((out / "tlq_report.json").read_text())
measured = {row["layer"]: row["peak_mem_mb"] * 2**20 for row in report["layers"]}
print(f"nproc {nproc}: {est.samples} samples, {est.tokens} tokens; peak device memory of the layer loop, GiB")
print("rank  layers  measured  est. layer work  est. device peak  measured/est.")
for r in est.ranks:
    peak = max(measured[i] for i in r.layers)
    print(f"{r.rank:>4}  {r.layers.start:>2}-{r.layers.stop - 1:<3}  {peak / GIB:8.3f}  {r.layer_work / GIB:15.3f}"
          f"  {r.device_peak / GIB:16.3f}  {peak / r.layer_work:13.2f}")
EOF
}

run() {  # run NPROC: calibrate, then compare
    local nproc=$1 out="$WORK/out-nproc$1" start
    start=$(date +%s)
    if ! timeout "$RUN_LIMIT_S" "$PY" -m tlq calibrate "$MODEL" --out "$out" --device cuda --nproc "$nproc" \
            --overwrite --quiet > "$WORK/nproc$nproc.log" 2>&1; then
        echo "gpu_smoke: tlq calibrate --device cuda --nproc $nproc failed or ran past ${RUN_LIMIT_S}s; last lines of $WORK/nproc$nproc.log:" >&2
        tail -n 20 "$WORK/nproc$nproc.log" >&2
        exit 1
    fi
    echo "gpu_smoke: --nproc $nproc calibrated in $(( $(date +%s) - start )) s"
    compare "$nproc" "$out"
}

run 1
if [ "$NGPU" -ge 2 ]; then
    run 2
else
    echo "gpu_smoke: one GPU visible, the two-rank run is skipped"
fi
echo "gpu_smoke: done (work folder $WORK)"
