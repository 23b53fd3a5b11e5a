#!/usr/bin/env bash
# The README's main command: sets up .venv, then runs `headwater demo` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/headwater demo "$@"
