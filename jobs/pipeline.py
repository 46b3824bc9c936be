"""Streaming ingestion: every feed from file drops (or Kafka) through bronze and silver.

    ./spark-submit.sh jobs/pipeline.py --conf conf/local.yaml --landing DIR --lake DIR [--available-now]
    ./spark-submit.sh jobs/pipeline.py --conf conf/local.yaml --source kafka --lake DIR [--landing DIR]

With Kafka the landing directory is only where the creatives dimension is dropped.
"""
from __future__ import annotations

import argparse
import sys

from advertisex import pipeline, sources
from advertisex.cli import run_job
from advertisex.config import FEEDS, ConfigError, load_conf
from advertisex.session import build_session


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline.py", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", required=True, help="environment YAML, e.g. conf/local.yaml")
    parser.add_argument("--landing", help="landing directory of the file drops (overrides the conf)")
    parser.add_argument("--lake", help="root of the Delta lake (overrides the conf)")
    parser.add_argument("--source", choices=["files", "kafka"], help="where the feeds come from (overrides the conf)")
    parser.add_argument("--available-now", action="store_true", help="process what is there, then exit")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    settings = load_conf(args.conf, {"landing": args.landing, "lake": args.lake, "source": args.source})
    if settings.lake is None:
        raise ConfigError("no lake: pass --lake DIR or set 'lake' in the conf")
    if settings.conf["source"] == "files" and settings.landing is None:
        raise ConfigError("no landing directory: pass --landing DIR or set 'landing' in the conf")
    # Fail on a missing secret, landing directory or Kafka credential before Spark starts.
    pipeline.privacy_from(settings)
    if settings.landing is not None:
        sources.check_landing(settings)
    if settings.conf["source"] == "kafka":
        for feed in FEEDS:
            sources.kafka_source_options(settings, feed)
    spark = build_session(settings, "advertisex-pipeline")
    pipeline.run(spark, settings, available_now=args.available_now)


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
