#!/usr/bin/env bash
# The prepared GPU check on a CUDA node without internet, from a copy of the repository:
#   scripts/gpu_check.sh [--tiny] [--out logs/gpu_check] [--budget-s 480] [--parts a,b]
# Environment: VENV (default .venv; created with --system-site-packages when missing, so the
# node's own CUDA torch is used), WHEELS (a local wheel folder for pip --find-links),
# TIMEOUT_S (default 540: the check's 480 s budget plus load and exit).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import gcnee.plan, torch, transformers, peft" 2>/dev/null; then
  pip_args=(--no-index)
  if [ -n "${WHEELS:-}" ]; then pip_args+=(--find-links "$WHEELS"); fi
  # With the dependencies from the wheel folder if they are there; else only the package
  # (the node's site packages must then hold torch, transformers, peft, bitsandbytes).
  "$VENV/bin/pip" install -q "${pip_args[@]}" -e . \
    || "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
exec timeout --kill-after=30 "${TIMEOUT_S:-540}" "$VENV/bin/python" scripts/gpu_check.py "$@"
