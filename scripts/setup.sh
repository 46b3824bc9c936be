#!/usr/bin/env bash
# Sets up a fresh machine for the project: a virtual environment with the pinned Python packages,
# the JVM jars (Delta, spark-avro, the Kafka connector) fetched from Maven Central into .jars/, and
# the Apache Kafka broker into .kafka/.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v java >/dev/null 2>&1; then
  echo "setup: Java 17+ is required (apt-get install openjdk-17-jre-headless)" >&2; exit 1
fi
if ! command -v mvn >/dev/null 2>&1; then
  echo "setup: Maven is required to fetch the jars; installing it with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq maven >/dev/null
fi

# Prometheus and Alertmanager (promtool, amtool) from Debian's packages: the alerting tests run
# the real servers and check the shipped rules and Alertmanager config with them.
if ! command -v promtool >/dev/null 2>&1 || ! command -v amtool >/dev/null 2>&1; then
  echo "setup: installing Prometheus and Alertmanager with apt-get"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
  # The packages register services; the project starts its own servers on free loopback ports.
  $sudo_ pkill -x prometheus >/dev/null 2>&1 || true
  $sudo_ pkill -x prometheus-alertmanager >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum setup.py | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

jar_stamp=.jars/.fetched-$(sha1sum pom.xml | cut -c1-12)
if [ ! -f "$jar_stamp" ]; then
  echo "setup: fetching JVM jars with Maven"
  rm -rf .jars && mkdir -p .jars/all
  mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=.jars/all
  # Keep only jars the pyspark wheel does not already ship: two versions of Jackson, Hadoop or
  # Scala on one classpath break Spark in ways that show up late.
  pyspark_jars=$(.venv/bin/python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')
  for jar in .jars/all/*.jar; do
    base=$(basename "$jar" .jar); artifact=${base%-*}
    if ! compgen -G "$pyspark_jars/$artifact-[0-9]*.jar" >/dev/null; then mv "$jar" .jars/; fi
  done
  rm -rf .jars/all
  touch "$jar_stamp"
fi
# The Kafka broker the tests and the real-time mode run (its own jars, never on Spark's classpath).
scripts/kafka.sh fetch
echo "setup: ready ($(ls .jars/*.jar | wc -l) jars in .jars/, Kafka broker in .kafka/)"
