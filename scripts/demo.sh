#!/usr/bin/env bash
# The demo: set up, generate sample drops, run the pipeline over them into a local lake, report.
#   ./scripts/demo.sh [--impressions N]
set -euo pipefail
cd "$(dirname "$0")/.."
impressions=50000
if [ "${1:-}" = "--impressions" ] && [ -n "${2:-}" ]; then impressions=$2; fi
./scripts/setup.sh
if [ -z "${ADVX_PSEUDONYMIZATION_KEY:-}" ]; then
  echo "demo: ADVX_PSEUDONYMIZATION_KEY is not set; using a throw-away demo key (never do this in production)" >&2
  export ADVX_PSEUDONYMIZATION_KEY="demo-only-$(date +%s)"
fi
rm -rf data/landing data/lake
.venv/bin/python jobs/generate.py --out data/landing --impressions "$impressions"
./spark-submit.sh jobs/pipeline.py --conf conf/local.yaml --landing data/landing --lake data/lake --available-now
./spark-submit.sh jobs/report.py --conf conf/local.yaml --lake data/lake
