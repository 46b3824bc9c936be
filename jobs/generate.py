"""Generate sample file drops (impressions, clicks/conversions, bid requests, creatives) and a manifest.

    python jobs/generate.py --out data/landing --impressions 100000 [--seed 7]
    python jobs/generate.py --out data/landing --kafka [--conf conf/local.yaml] [--rate 5000]

With --kafka the three feeds are published to the topics the conf names (the creatives file and
the manifest still go under --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from advertisex.cli import run_job
from advertisex.config import ConfigError, load_conf, resolve_secrets
from advertisex.generator import GeneratorOptions, KafkaPublisher, generate


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, GeneratorOptions]:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="landing directory to write the drops into (must be empty or absent)")
    parser.add_argument("--kafka", action="store_true", help="publish the feeds to Kafka instead of writing files")
    parser.add_argument("--conf", help="conf naming the brokers and topics (with --kafka; default: the defaults)")
    parser.add_argument("--bootstrap-servers", help="Kafka brokers (overrides the conf)")
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second with --kafka; 0: as fast as possible")
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
    if args.rate < 0:
        raise ConfigError(f"--rate must be 0 or more messages per second, got {args.rate}")
    if (args.conf or args.bootstrap_servers or args.rate) and not args.kafka:
        raise ConfigError("--conf, --bootstrap-servers and --rate only apply with --kafka")
    return args, GeneratorOptions(**values)


def publisher_from(args: argparse.Namespace) -> KafkaPublisher:
    kafka = load_conf(args.conf).conf["kafka"]
    config = {"bootstrap.servers": args.bootstrap_servers or kafka["bootstrap_servers"]}
    config.update(resolve_secrets(kafka["producer_options"], "kafka.producer_options"))
    return KafkaPublisher(config, kafka["topics"], kafka["schema_registry_ids"][0], rate=args.rate or None)


def main(argv: list[str]) -> None:
    args, options = parse_args(argv)
    out = args.out
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"output directory is not empty: {out}")
    publisher = publisher_from(args) if args.kafka else None
    manifest = generate(out, options, publisher=publisher)
    total = sum(manifest.input_records.values())
    where = "Kafka" if publisher else out
    print(f"wrote {total:,} records to {where} (manifest: {os.path.join(out, 'manifest.json')})")


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
