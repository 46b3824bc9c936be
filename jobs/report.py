"""Print the lake's report: rows per table, quarantine by rule, duplicates dropped, top campaigns.

    ./spark-submit.sh jobs/report.py --conf conf/local.yaml --lake DIR
"""
from __future__ import annotations

import argparse
import sys

from advertisex import report
from advertisex.cli import run_job
from advertisex.config import ConfigError, load_conf
from advertisex.session import build_session


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", required=True)
    parser.add_argument("--lake")
    parser.add_argument("--top", type=int, default=5, help="how many campaigns to list")
    args = parser.parse_args(argv)
    settings = load_conf(args.conf, {"lake": args.lake})
    if settings.lake is None:
        raise ConfigError("no lake: pass --lake DIR or set 'lake' in the conf")
    spark = build_session(settings, "advertisex-report")
    print(report.render(report.build(spark, settings, top=args.top)))


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
