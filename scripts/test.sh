#!/usr/bin/env bash
# Set up from scratch if needed, then run the whole test suite.
#   ./scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
