"""Benchmark: the pipeline against the raw Spark ceiling, on the same generated drops.

    .venv/bin/python jobs/benchmark.py --impressions 1000000 [--work DIR] [--keep] [--ingestion-only]
    .venv/bin/python jobs/benchmark.py --realtime --impressions 100000 --rate 5000 [--duration 120]
        [--sources kafka,files] [--ingestion-only]
    .venv/bin/python jobs/benchmark.py --gold-scope --work DIR   # on the lake a run above left in DIR
    .venv/bin/python jobs/benchmark.py --dedup-lookup 1000000,10000000,40000000 [--days 7] [--work DIR]

All runs use the same drops. The ceiling reads every file of the three feeds with spark.read and
an explicit schema and appends them to Delta with no logic. The pipeline runs jobs/pipeline.py
with availableNow: files -> bronze/quarantine/silver, then the correlation query -> gold. The
correlation query is run again from a fresh checkpoint with each state store provider, and the
backfill recomputes every date. ``--ingestion-only`` stops after files -> silver (the ceiling
comparison alone), timed in the session's first run and again in a second one. Figures are
events per second over all three feeds (the backfill: silver events). ``--gold-scope`` times what
one streaming gold batch costs when it rebuilds a whole date, two hours of it, or one hour, on an
existing lake. ``--dedup-lookup`` times silver's id lookup (``lake.new_rows``) of one micro-batch
against tables of the given sizes, with each ``silver.dedup_scope``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time

from pyspark.sql import functions as F

from advertisex import backfill, correlation, lake, pipeline
from advertisex.cli import run_job
from advertisex.config import ConfigError, load_conf
from advertisex.generator import GeneratorOptions, generate
from advertisex.parsing import bid_request_avro_schema, ddl_schema
from advertisex.session import STATE_STORE_PROVIDERS, build_session

import realtime_bench  # jobs/realtime_bench.py, next to this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ceiling(spark, landing: str, lake: str) -> float:
    """spark.read of every drop, then a Delta append with no logic; returns seconds."""
    started = time.monotonic()
    spark.read.schema(ddl_schema("impressions.ddl")).json(f"{landing}/impressions").write.format("delta").save(f"{lake}/impressions")
    (spark.read.schema(ddl_schema("clicks_conversions.ddl")).option("header", "true").csv(f"{landing}/clicks_conversions")
     .write.format("delta").save(f"{lake}/clicks_conversions"))
    (spark.read.format("avro").option("avroSchema", bid_request_avro_schema()).option("ignoreCorruptFiles", "true")
     .load(f"{landing}/bid_requests").write.format("delta").save(f"{lake}/bid_requests"))
    return time.monotonic() - started


def _print_header(events: int, manifest: dict, size: int) -> None:
    print(f"\n{events:,} events ({manifest['input_records']}), {size / 1e6:,.0f} MB of drops; "
          f"{os.cpu_count()} cores, {platform.platform()}")


def _print_rows(rows: list[tuple[str, float, float]]) -> None:
    print(f"{'run':<72} {'seconds':>9} {'events/s':>11} {'/ ceiling':>9}")
    for name, seconds, rate in rows:
        print(f"{name:<72} {seconds:>9.1f} {rate:>11,.0f} {rate / rows[0][2]:>9.0%}")


def gold_scope(spark, settings, repeats: int) -> None:
    """The streaming gold rebuild (candidates from gold/_candidates) of the lake's middle date: the
    whole date, then two hours and one hour of it, in turn, ``repeats`` times."""
    impressions = spark.read.format("delta").load(settings.table("silver/impressions"))
    dates = sorted(r["event_date"] for r in impressions.select("event_date").distinct().collect() if r["event_date"])
    day = dates[len(dates) // 2]
    count = impressions.filter(impressions["event_date"] == day).count()
    versions = backfill.silver_versions(spark, settings)
    scopes = {"whole date": None, "2 hours (12-13)": {day: [12, 13]}, "1 hour (12)": {day: [12]}}
    seconds: dict[str, list[float]] = {name: [] for name in scopes}
    for _ in range(repeats):
        for name, hours in scopes.items():
            started = time.monotonic()
            backfill.rebuild(spark, settings, day, day, multi_touch=False, silver_versions=versions, hours=hours,
                             candidates_of=lambda silver, since: correlation.read_candidates(spark, settings, since, day))
            seconds[name].append(time.monotonic() - started)
    print(f"\nstreaming gold rebuild of {day} ({count:,} impressions); the first round is cold")
    print(f"{'scope':<20} {'first':>7} {'median of the rest':>19} {'range of the rest':>18}")
    for name, runs in seconds.items():
        rest = sorted(runs[1:])
        print(f"{name:<20} {runs[0]:>7.1f} {rest[len(rest) // 2]:>19.1f} {f'{rest[0]:.1f}-{rest[-1]:.1f}':>18}")


def dedup_lookup(spark, work: str, sizes: list[int], days: int, repeats: int = 3) -> None:
    """Silver's id lookup of one micro-batch (the table's newest 10,000 rows again, and 10,000 new
    ids at the same times) against a table of each size: ``days`` days of impression ids,
    partitioned by date, in 500 files that each cover a slice of event time as a stream's
    micro-batches do. Both scopes: the whole table, and the batch's event times."""
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc).timestamp()
    results = []
    for size in sizes:
        path = os.path.join(work, f"ids-{size}")
        seconds_per_row = days * 86400 / size
        if not os.path.isdir(os.path.join(path, "_delta_log")):
            (spark.range(size, numPartitions=500)
             .select(F.expr("uuid()").alias("impression_id"),
                     F.timestamp_seconds(F.lit(start) + F.col("id") * seconds_per_row).alias("event_time"))
             .withColumn("event_date", F.to_date("event_time"))
             .write.format("delta").partitionBy("event_date").save(path))
        recent = spark.read.format("delta").load(path).orderBy(F.col("event_time").desc()).limit(10_000).cache()
        batch = recent.unionByName(recent.select(F.expr("uuid()").alias("impression_id"), "event_time", "event_date")).cache()
        first, last = batch.agg(F.min("event_time"), F.max("event_time")).first()
        scopes = {"table": None, "batch_event_times": lake.event_times(first, last)}
        for scope, within in scopes.items():
            runs = []
            for _ in range(repeats):
                started = time.monotonic()
                new = lake.new_rows(batch, path, "impression_id", batch.select("impression_id"), within=within).count()
                runs.append(time.monotonic() - started)
            assert new == 10_000, f"{scope}: {new:,} new rows, not 10,000"
            results.append((size, scope, runs))
        batch.unpersist()
        recent.unpersist()
    print(f"\nsilver id lookup of a 20,000-row micro-batch (half of it present); {days} days of ids in 500 files; "
          f"{os.cpu_count()} cores")
    print(f"{'table rows':>12} {'dedup_scope':<18} {'runs (s)':<24} {'median':>7}")
    for size, scope, runs in results:
        print(f"{size:>12,} {scope:<18} {', '.join(f'{r:.2f}' for r in runs):<24} {sorted(runs)[len(runs) // 2]:>7.2f}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000)
    parser.add_argument("--work", default=os.path.join(ROOT, "data", "benchmark"))
    parser.add_argument("--conf", default=os.path.join(ROOT, "conf", "local.yaml"))
    parser.add_argument("--keep", action="store_true", help="reuse drops generated by an earlier run")
    parser.add_argument("--state-files-per-batch", type=int, default=16,
                        help="silver files per micro-batch in the bounded-state run")
    parser.add_argument("--ingestion-only", action="store_true",
                        help="only the ceiling and files -> bronze/quarantine/silver (no gold, state stores, backfill);"
                             " with --realtime: no correlation query in the drains and fixed-rate runs")
    parser.add_argument("--realtime", action="store_true",
                        help="Kafka against file drops: capacity, then latency and backlog at --rate")
    parser.add_argument("--rate", type=float, default=5000, help="events per second in the fixed-rate runs")
    parser.add_argument("--duration", type=int, default=120, help="seconds of input in the fixed-rate runs")
    parser.add_argument("--event-time", choices=("live", "compressed"), default="live",
                        help="fixed-rate runs: event time advances with the clock (live), or two days of it pass "
                             "in --duration (compressed, the runs before 2026-11-26)")
    parser.add_argument("--sources", default="kafka,files",
                        help="real time: the sources to run, comma-separated (kafka, files)")
    parser.add_argument("--bootstrap-servers", help="use these brokers instead of starting scripts/kafka.sh")
    parser.add_argument("--gold-scope", action="store_true",
                        help="on the lake an earlier run left in --work: a gold batch's rebuild of a date, 2 hours, 1 hour")
    parser.add_argument("--dedup-lookup", metavar="ROWS,...",
                        help="time silver's id lookup against tables of these sizes, with each silver.dedup_scope")
    parser.add_argument("--days", type=int, default=7, help="--dedup-lookup: days of event time the table holds")
    args = parser.parse_args(argv)
    os.environ.setdefault("ADVX_PSEUDONYMIZATION_KEY", "benchmark-key")
    if args.dedup_lookup:
        try:
            sizes = [int(n) for n in args.dedup_lookup.split(",")]
        except ValueError:
            raise ConfigError(f"--dedup-lookup must be row counts separated by commas, got {args.dedup_lookup!r}") from None
        if not sizes or min(sizes) < 100_000 or args.days < 1:
            raise ConfigError("--dedup-lookup needs tables of at least 100,000 rows and --days at least 1")
        settings = load_conf(args.conf)
        dedup_lookup(build_session(settings, "advertisex-benchmark-dedup"), os.path.join(args.work, "dedup"), sizes, args.days)
        return
    if args.gold_scope:
        lake = os.path.join(args.work, "lake")
        if not os.path.isdir(os.path.join(lake, "gold", "_candidates")):
            raise ConfigError(f"--gold-scope needs the lake of an earlier full run in --work: no {lake}/gold/_candidates")
        settings = load_conf(args.conf, {"landing": os.path.join(args.work, "landing"), "lake": lake})
        gold_scope(build_session(settings, "advertisex-benchmark-gold-scope"), settings, repeats=4)
        return
    if args.realtime:
        if args.duration < 60:
            raise ConfigError("--duration must be at least 60 seconds")
        sources = tuple(dict.fromkeys(name.strip() for name in args.sources.split(",") if name.strip()))
        unknown = [name for name in sources if name not in realtime_bench.SOURCES]
        if unknown or not sources:
            raise ConfigError(f"--sources: unknown source {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(realtime_bench.SOURCES)}")
        settings = load_conf(args.conf)
        spark = build_session(settings, "advertisex-benchmark-realtime")
        realtime_bench.main_realtime(spark, settings, args.work, args.impressions, args.rate, args.duration,
                                     args.bootstrap_servers, ceiling, args.event_time, sources,
                                     with_gold=not args.ingestion_only)
        return
    landing = os.path.join(args.work, "landing")
    if not (args.keep and os.path.exists(os.path.join(landing, "manifest.json"))):
        shutil.rmtree(args.work, ignore_errors=True)
        generate(landing, GeneratorOptions(impressions=args.impressions, files_per_day=8))
    with open(os.path.join(landing, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    events = sum(manifest["input_records"].values())
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(landing) for f in files)

    for sub in ("ceiling-warmup", "ceiling", "lake", "lake-warm"):
        shutil.rmtree(os.path.join(args.work, sub), ignore_errors=True)
    settings = load_conf(args.conf, {"landing": landing, "lake": os.path.join(args.work, "lake")})
    spark = build_session(settings, "advertisex-benchmark")
    ceiling(spark, landing, os.path.join(args.work, "ceiling-warmup"))  # JIT and file cache warm-up
    ceiling_s = ceiling(spark, landing, os.path.join(args.work, "ceiling"))
    timings: dict = {}
    started = time.monotonic()
    pipeline.run(spark, settings, available_now=True, timings=timings, with_gold=not args.ingestion_only)
    if args.ingestion_only:
        # The ceiling is timed after a warm-up run; the pipeline is timed both ways: its first run in
        # this JVM (what a scheduled job pays) and a second one into a fresh lake (a running stream).
        warm: dict = {}
        pipeline.run(spark, load_conf(args.conf, {"landing": landing, "lake": os.path.join(args.work, "lake-warm")}),
                     available_now=True, timings=warm, with_gold=False)
        _print_header(events, manifest, size)
        _print_rows([("raw ceiling: spark.read -> Delta append", ceiling_s, events / ceiling_s),
                     ("pipeline: files -> bronze + quarantine + silver", timings["ingestion"],
                      events / timings["ingestion"]),
                     ("  the same, second run in this JVM", warm["ingestion"], events / warm["ingestion"])])
        return
    pipeline_s = time.monotonic() - started
    stores = {}
    for provider in ("hdfs", "rocksdb"):
        spark.conf.set("spark.sql.streaming.stateStore.providerClass", STATE_STORE_PROVIDERS[provider])
        started = time.monotonic()
        query = correlation.start(spark, settings, available_now=True,
                                  checkpoint=os.path.join(args.work, "lake", "_checkpoints", f"gold-{provider}"))
        query.awaitTermination()
        stores[provider] = (time.monotonic() - started, correlation.state_rows(query))
    # Bounded state: the same query in small micro-batches (a few silver files each), so the
    # watermark moves between batches; state rows must level off instead of growing with the input.
    small = dataclasses.replace(settings, conf=copy.deepcopy(settings.conf))
    small.conf["correlation"]["max_files_per_trigger"] = args.state_files_per_batch
    spark.conf.set("spark.sql.streaming.stateStore.providerClass", STATE_STORE_PROVIDERS["hdfs"])
    query = correlation.start(spark, small, available_now=True,
                              checkpoint=os.path.join(args.work, "lake", "_checkpoints", "gold-small-batches"))
    query.awaitTermination()
    series = [(p["batchId"], p["numInputRows"], sum(op["numRowsTotal"] for op in p["stateOperators"]),
               sum(op["numRowsDroppedByWatermark"] for op in p["stateOperators"])) for p in query.recentProgress]
    silver_events = sum(manifest["silver"].values())
    dates = sorted({k.split("|")[0] for k in manifest["gold_daily"]})
    started = time.monotonic()
    backfill.run(spark, settings, dt.date.fromisoformat(dates[0]), dt.date.fromisoformat(dates[-1]))
    backfill_s = time.monotonic() - started

    rows = [
        ("raw ceiling: spark.read -> Delta append", ceiling_s, events / ceiling_s),
        ("pipeline: files -> bronze + silver + gold", pipeline_s, events / pipeline_s),
        ("  of which files -> bronze + quarantine + silver", timings["ingestion"], events / timings["ingestion"]),
        ("  of which silver -> gold (correlation query)", timings["gold"], events / timings["gold"]),
    ]
    rows += [(f"correlation query alone, {p} state store ({n:,} state rows at end)", s_, events / s_)
             for p, (s_, n) in stores.items()]
    rows.append((f"backfill of {len(dates)} dates (silver -> gold)", backfill_s, silver_events / backfill_s))
    _print_header(events, manifest, size)
    _print_rows(rows)
    print(f"\ncorrelation query in batches of {args.state_files_per_batch} silver files: state rows after each batch")
    print(f"{'batch':>6} {'input rows':>11} {'state rows':>11} {'dropped by watermark':>21}")
    for batch_id, rows_in, state, dropped in series:
        print(f"{batch_id:>6} {rows_in:>11,} {state:>11,} {dropped:>21,}")


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
