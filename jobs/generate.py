"""Generate sample file drops (impressions, clicks/conversions, bid requests, creatives) and a manifest.

    python jobs/generate.py --out data/landing --impressions 100000 [--seed 7]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from advertisex.cli import run_job
from advertisex.config import ConfigError
from advertisex.generator import GeneratorOptions, generate


def parse_args(argv: list[str]) -> tuple[str, GeneratorOptions]:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="landing directory to write the drops into (must be empty or absent)")
    for option in dataclasses.fields(GeneratorOptions):
        flag = "--" + option.name.replace("_", "-")
        parser.add_argument(flag, type=type(option.default), default=option.default, help=f"default {option.default}")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GeneratorOptions)}
    if values["impressions"] < 1:
        raise ConfigError("--impressions must be at least 1")
    for name in ("rtb_share", "bid_rate", "win_rate", "ctr", "cvr", "duplicate_rate", "invalid_rate", "bot_rate", "late_rate"):
        if not 0 <= values[name] <= 1 or (name in ("bid_rate", "win_rate") and values[name] == 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a rate in (0, 1], got {values[name]}")
    return args.out, GeneratorOptions(**values)


def main(argv: list[str]) -> None:
    out, options = parse_args(argv)
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"output directory is not empty: {out}")
    manifest = generate(out, options)
    total = sum(manifest.input_records.values())
    print(f"wrote {total:,} records to {out} (manifest: {os.path.join(out, 'manifest.json')})")


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
