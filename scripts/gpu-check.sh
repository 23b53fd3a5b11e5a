#!/usr/bin/env bash
# Runs every GPU code path for real and checks each against its reference (issue 22): one JSON
# line per check on stdout and in --out DIR (default gpu-check-out/), exit 1 when any disagrees.
# Without CUDA: tiny shapes, Triton kernels under TRITON_INTERPRET=1 (what the default suite runs).
# Flags: --help. Python: $PYTHON, else .venv/bin/python when it has torch, else python3 (a GPU
# machine's own torch + Triton; the checkout goes on PYTHONPATH). docs/operations.md: on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check "$@"
