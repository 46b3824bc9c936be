#!/usr/bin/env bash
# The demo: set up, generate sample drops, run the pipeline over them into a local lake, backfill
# gold (multi-touch credits), report.
#   ./scripts/demo.sh [--impressions N]
# The real-time demo: the pipeline on the Kafka topics (broker from scripts/kafka.sh start), running
# until Ctrl-C, into data/lake-kafka; publish events with jobs/generate.py --kafka meanwhile.
#   ./scripts/demo.sh --kafka
set -euo pipefail
cd "$(dirname "$0")/.."
impressions=50000
if [ "${1:-}" = "--impressions" ] && [ -n "${2:-}" ]; then impressions=$2; fi
./scripts/setup.sh
if [ -z "${ADVX_PSEUDONYMIZATION_KEY:-}" ]; then
  echo "demo: ADVX_PSEUDONYMIZATION_KEY is not set; using a throw-away demo key (never do this in production)" >&2
  export ADVX_PSEUDONYMIZATION_KEY="demo-only-$(date +%s)"
fi
if [ "${1:-}" = "--kafka" ]; then
  if ! ./scripts/kafka.sh status; then echo "demo: no broker; run ./scripts/kafka.sh start first" >&2; exit 1; fi
  # The creatives dimension is a file drop in every mode; the generator's default seed makes the
  # same creatives as jobs/generate.py --kafka will reference.
  rm -rf data/landing-kafka && .venv/bin/python -c 'from advertisex.generator import Generator, GeneratorOptions
Generator(GeneratorOptions()).write_creatives("data/landing-kafka")'
  echo "demo: consuming Kafka into data/lake-kafka until Ctrl-C; in another terminal run:" >&2
  echo "  .venv/bin/python jobs/generate.py --out data/kafka-produced --kafka --rate 5000 --impressions 100000" >&2
  exec ./spark-submit.sh jobs/pipeline.py --conf conf/local.yaml --source kafka --landing data/landing-kafka --lake data/lake-kafka
fi
rm -rf data/landing data/lake
.venv/bin/python jobs/generate.py --out data/landing --impressions "$impressions"
./spark-submit.sh jobs/pipeline.py --conf conf/local.yaml --landing data/landing --lake data/lake --available-now
# The event dates the generator wrote, for the backfill (which adds the multi-touch credits).
read -r first last < <(.venv/bin/python -c 'import json; d = sorted({k.split("|")[0] for k in json.load(open("data/landing/manifest.json"))["gold_daily"]}); print(d[0], d[-1])')
./spark-submit.sh jobs/backfill.py --conf conf/local.yaml --lake data/lake --from "$first" --to "$last"
./spark-submit.sh jobs/report.py --conf conf/local.yaml --lake data/lake
