#!/usr/bin/env bash
# Runs a job with the real spark-submit, handing it the project's jars and its code as a zip, so
# the same command works in local mode and on a cluster:
#   ./spark-submit.sh jobs/pipeline.py --conf conf/local.yaml --landing DIR --lake DIR --available-now
# On a cluster set SPARK_HOME (its bin/spark-submit is used) and SPARK_SUBMIT_OPTS_EXTRA, e.g.
#   SPARK_SUBMIT_OPTS_EXTRA="--master yarn --deploy-mode cluster" ./spark-submit.sh jobs/pipeline.py ...
# ADVX_DRIVER_MEMORY (default 6g) and ADVX_DRIVER_JAVA_OPTIONS (e.g. -XX:+UseParallelGC, as
# conf/local.yaml asks of a plain python run) size and tune the driver JVM.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 1 ]; then echo "usage: ./spark-submit.sh JOB.py [job arguments]" >&2; exit 2; fi
job="$1"; shift
if [ ! -f "$job" ]; then echo "spark-submit.sh: error: job not found: $job" >&2; exit 2; fi

if [ -n "${SPARK_HOME:-}" ] && [ -x "$SPARK_HOME/bin/spark-submit" ]; then
  submit="$SPARK_HOME/bin/spark-submit"
elif [ -x "$here/.venv/bin/spark-submit" ]; then
  submit="$here/.venv/bin/spark-submit"
  export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$here/.venv/bin/python}"
  export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$here/.venv/bin/python}"
else
  echo "spark-submit.sh: error: no spark-submit found; run scripts/setup.sh or set SPARK_HOME" >&2; exit 2
fi

jars=$(ls "$here"/.jars/*.jar 2>/dev/null | paste -sd, -)
if [ -z "$jars" ]; then echo "spark-submit.sh: error: no jars in .jars/; run scripts/setup.sh" >&2; exit 2; fi

# The package (with its schemas and defaults) as one zip for --py-files; rebuilt when code changes.
mkdir -p "$here/dist"
zip_path="$here/dist/advertisex.zip"
(cd "$here" && rm -f "$zip_path" && python3 - "$zip_path" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for root, _, files in os.walk("advertisex", followlinks=True):
        for name in files:
            if not name.endswith(".pyc"):
                z.write(os.path.join(root, name))
PY
)

export ADVX_SUBMITTED=1
exec "$submit" \
  --jars "$jars" \
  --py-files "$zip_path" \
  --driver-memory "${ADVX_DRIVER_MEMORY:-6g}" \
  --driver-java-options "-Dlog4j.configurationFile=file:$here/conf/log4j2.properties ${ADVX_DRIVER_JAVA_OPTIONS:-}" \
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
  ${SPARK_SUBMIT_OPTS_EXTRA:-} \
  "$job" "$@"
