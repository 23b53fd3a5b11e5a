#!/usr/bin/env bash
# The README's test command. Sets everything up on a fresh machine (.venv, pinned dependencies);
# the tests start the Kafka-protocol broker (Tansu) they need themselves.
#   scripts/test.sh            default suite (CPU, < 20 min on 2 cores)
#   scripts/test.sh --slow     the slow suites (soak, real-model) only
#   scripts/test.sh ARGS...    extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
marker="not slow"
if [ "${1:-}" = "--slow" ]; then marker="slow"; shift; fi
exec .venv/bin/python -m pytest -m "$marker" "$@"
