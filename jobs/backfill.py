"""Recompute gold from silver for a range of event dates; running it twice changes nothing.

    ./spark-submit.sh jobs/backfill.py --conf conf/local.yaml --lake DIR --from 2026-11-16 --to 2026-11-17
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys

from advertisex import backfill
from advertisex.cli import run_job
from advertisex.config import ConfigError, load_conf
from advertisex.session import build_session


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-11-16: {text!r}") from None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="backfill.py", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", required=True, help="environment YAML, e.g. conf/local.yaml")
    parser.add_argument("--lake", help="root of the Delta lake (overrides the conf)")
    parser.add_argument("--from", dest="first", type=_date, required=True, help="first event date, YYYY-MM-DD")
    parser.add_argument("--to", dest="last", type=_date, required=True, help="last event date, YYYY-MM-DD (inclusive)")
    args = parser.parse_args(argv)
    settings = load_conf(args.conf, {"lake": args.lake})
    if settings.lake is None:
        raise ConfigError("no lake: pass --lake DIR or set 'lake' in the conf")
    backfill.dates_between(args.first, args.last)  # a reversed range fails before Spark starts
    spark = build_session(settings, "advertisex-backfill")
    for result in backfill.run(spark, settings, args.first, args.last):
        print(f"{result.date}: gold rewritten in {result.seconds:.1f} s")


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
