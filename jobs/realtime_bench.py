"""The real-time half of jobs/benchmark.py (``--realtime``): Kafka against file drops, side by side.

1. Capacity: the same generated events are published to Kafka and written as file drops; each is
   drained with availableNow, and the raw ceiling of each source (spark.read -> Delta append, no
   logic) is timed on the same events.
2. Latency at a fixed rate: a continuous pipeline while events arrive at ``--rate`` per second,
   from Kafka (the producer paces itself) and from files (one drop per feed per second). Latency is
   from the moment an event was produced (Kafka's CreateTime; for files, the moment its file
   appeared) to the Delta commit that put it in silver (the commit's timestamp in the table's log),
   and to the end of the first gold micro-batch that started after that commit. The backlog
   (produced - ingested) is sampled every 5 s.
3. Event time: ``live`` (the default) starts it at the run and lets it advance with the clock, as a
   real feed's does; ``compressed`` puts two days of it into the run, as the runs before
   2026-11-26 did.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import glob
import json
import os
import shutil
import subprocess
import threading
import time

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from advertisex import backfill, correlation, lake, maintenance, pipeline
from advertisex.config import FEEDS, Settings
from advertisex.generator import Generator, GeneratorOptions, KafkaPublisher
from advertisex.gold import SILVER_TABLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("kafka", "files")
EVENTS_PER_IMPRESSION = 2.8  # all feeds, from the generator's default funnel
GOLD_WAIT_SECONDS = 900  # after the input is ingested, at most this long for gold to read all of silver


class Broker:
    """scripts/kafka.sh for the length of the benchmark, unless brokers were given."""

    def __init__(self, work: str, bootstrap: str | None):
        self.given = bootstrap
        self.env = {**os.environ, "ADVX_KAFKA_DIR": os.path.join(work, "kafka"), "ADVX_KAFKA_PORT": "19192"}

    @property
    def bootstrap(self) -> str:
        return self.given or "127.0.0.1:19192"

    def __enter__(self):
        if not self.given:
            shutil.rmtree(self.env["ADVX_KAFKA_DIR"], ignore_errors=True)
            subprocess.run([os.path.join(ROOT, "scripts", "kafka.sh"), "start"], env=self.env, check=True)
        return self

    def __exit__(self, *exc):
        if not self.given:
            subprocess.run([os.path.join(ROOT, "scripts", "kafka.sh"), "stop"], env=self.env, check=True)


def _settings(base: Settings, source: str, landing: str, lake: str, bootstrap: str, prefix: str) -> Settings:
    conf = copy.deepcopy(base.conf)
    conf.update(source=source, landing=landing, lake=lake, checkpoints=None)
    conf["kafka"]["bootstrap_servers"] = bootstrap
    conf["kafka"]["topics"] = {feed: f"{prefix}.{feed}" for feed in FEEDS}
    return dataclasses.replace(base, conf=conf)


def _publisher(settings: Settings, rate: float | None) -> KafkaPublisher:
    kafka = settings.conf["kafka"]
    return KafkaPublisher({"bootstrap.servers": kafka["bootstrap_servers"]}, kafka["topics"],
                          kafka["schema_registry_ids"][0], rate=rate)


def kafka_ceiling(spark: SparkSession, settings: Settings, lake: str) -> float:
    """spark.read of every message of the three topics, appended to Delta as they are."""
    started = time.monotonic()
    for feed, topic in settings.conf["kafka"]["topics"].items():
        (spark.read.format("kafka").option("kafka.bootstrap.servers", settings.conf["kafka"]["bootstrap_servers"])
         .option("subscribe", topic).option("startingOffsets", "earliest").load()
         .write.format("delta").save(f"{lake}/{feed}"))
    return time.monotonic() - started


def capacity(spark: SparkSession, base: Settings, work: str, impressions: int, bootstrap: str, ceiling,
             sources: tuple[str, ...] = SOURCES, with_gold: bool = True) -> list:
    """Rows (name, seconds, events) of the availableNow drains and ceilings of the sources."""
    options = GeneratorOptions(impressions=impressions, files_per_day=8)
    # A previous run's drops, lake and ceilings; {work}/kafka is emptied when the broker starts.
    shutil.rmtree(f"{work}/files", ignore_errors=True)
    files = _settings(base, "files", f"{work}/files/landing", f"{work}/files/lake", bootstrap, "cap")
    kafka = _settings(base, "kafka", f"{work}/kafka/landing", f"{work}/kafka/lake", bootstrap, "cap")
    settings = {"files": files, "kafka": kafka}
    manifest = None
    if "files" in sources:
        manifest = Generator(options).generate(files.landing)
    if "kafka" in sources:
        manifest = Generator(options).generate(kafka.landing, publisher=_publisher(kafka, None))
    events = sum(manifest.input_records.values())
    rows = []
    if "files" in sources:
        ceiling(spark, files.landing, f"{work}/files/ceiling-warmup")
        files_ceiling = ceiling(spark, files.landing, f"{work}/files/ceiling")
        rows.append(("files: raw ceiling, spark.read -> Delta append", files_ceiling, events))
    if "kafka" in sources:
        kafka_ceiling(spark, kafka, f"{work}/kafka/ceiling-warmup")
        rows.append(("kafka: raw ceiling, spark.read -> Delta append",
                     kafka_ceiling(spark, kafka, f"{work}/kafka/ceiling"), events))
    for name in sources:
        timings: dict = {}
        pipeline.run(spark, settings[name], available_now=True, timings=timings, with_gold=with_gold)
        rows.append((f"{name}: pipeline, bronze + quarantine + silver (availableNow)", timings["ingestion"], events))
        if with_gold:
            rows.append((f"{name}: pipeline, silver -> gold (availableNow)", timings["gold"], events))
    return rows


class _FileDropper:
    """Moves pre-generated drops into the landing directory, one file per feed per second."""

    def __init__(self, staged: str, landing: str):
        self.staged, self.landing = staged, landing
        self.dropped_at: dict[str, float] = {}  # file name -> epoch seconds it appeared
        self.records = 0

    def run(self) -> None:
        files = [(name.split(".")[0], feed, name) for feed in FEEDS
                 for name in os.listdir(os.path.join(self.staged, feed))]
        slots = sorted({slot for slot, _, _ in files})
        started = time.time()
        for n, slot in enumerate(slots):
            time.sleep(max(0.0, started + n - time.time()))
            for _, feed, name in (f for f in files if f[0] == slot):
                source = os.path.join(self.staged, feed, name)
                self.records += _count_records(source, feed)
                os.replace(source, os.path.join(self.landing, feed, name))
                self.dropped_at[f"{feed}/{name}"] = time.time()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spark_jvm_pid() -> int | None:
    """The JVM PySpark started for this process: its child whose command line runs java."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = fh.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read().split(b"\0")[0]
        except OSError:
            continue
        if parent == me and command.endswith(b"java"):
            return int(entry)
    return None


class CpuMeter:
    """CPU seconds the Spark JVM (in local mode: the driver and every task) and this Python process
    (the driver's Python side, and the Kafka producer's thread) use between ``start`` and ``stop``.
    Less noisy than latency for telling whether a change made a micro-batch cheaper."""

    def __init__(self):
        self.jvm = _spark_jvm_pid()
        self.started: tuple[float, float] = (0.0, 0.0)
        self.used: dict[str, float] = {}

    def _now(self) -> tuple[float, float]:
        return (_cpu_seconds(self.jvm) if self.jvm else float("nan"), time.process_time())

    def start(self) -> None:
        self.started = self._now()

    def stop(self) -> dict[str, float]:
        jvm, python = self._now()
        self.used = {"jvm": jvm - self.started[0], "python": python - self.started[1]}
        return self.used


def _count_records(path: str, feed: str) -> int:
    if feed == "bid_requests":
        import fastavro

        with open(path, "rb") as fh:
            return sum(1 for _ in fastavro.reader(fh))
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip()) - (feed == "clicks_conversions")


def _ingested(spark: SparkSession, settings: Settings) -> int:
    try:
        metrics = spark.read.format("delta").load(settings.table("ops/metrics")).filter("feed != 'gold'")
        return int(metrics.agg(F.sum("rows_in")).first()[0] or 0)
    except Exception:  # noqa: BLE001 - the table appears with the first batch
        return 0


def _produced_at_kafka(spark: SparkSession, settings: Settings) -> DataFrame:
    kafka = settings.conf["kafka"]
    return (
        spark.read.format("kafka").option("kafka.bootstrap.servers", kafka["bootstrap_servers"])
        .option("subscribe", ",".join(kafka["topics"].values())).option("startingOffsets", "earliest").load()
        .select(F.concat_ws("/", "topic", F.col("partition").cast("string"), F.col("offset").cast("string")).alias("source"),
                F.col("timestamp").alias("produced_at"))
    )


def _produced_at_files(spark: SparkSession, dropper: _FileDropper) -> DataFrame:
    rows = [(name, float(at)) for name, at in dropper.dropped_at.items()]
    return (spark.createDataFrame(rows, "name string, at double")
            .select("name", F.timestamp_seconds("at").alias("produced_at")))


def silver_commits(spark: SparkSession, settings: Settings, table: str) -> DataFrame:
    """(ingest_batch, silver_at): when each micro-batch's append to ``silver/<table>`` committed:
    the timestamp, in the Delta log, of the commit whose ``userMetadata`` marks the batch
    (``lake.parse_mark``: app id "<query id>:silver/<table>", the rows' tag being
    "<query id>:<batch>"). By the commit, not by data file: auto compaction rewrites the files."""
    path = settings.table(f"silver/{table}")
    commits = (spark.read.schema("commitInfo STRUCT<timestamp: BIGINT, userMetadata: STRING>")
               .json(sorted(glob.glob(os.path.join(path, "_delta_log", "*.json"))))
               .select("commitInfo.timestamp", "commitInfo.userMetadata").collect())  # a row per micro-batch
    stamps: dict[str, dt.datetime] = {}
    for commit in commits:
        mark = lake.parse_mark(commit["userMetadata"])
        if mark is not None:
            tag = f"{mark[0].rsplit(':silver/', 1)[0]}:{mark[1]}"
            at = dt.datetime.fromtimestamp(commit["timestamp"] / 1000, dt.timezone.utc)
            stamps[tag] = min(stamps.get(tag, at), at)
    return spark.createDataFrame(list(stamps.items()), "ingest_batch STRING, silver_at TIMESTAMP")


def layout(spark: SparkSession, settings: Settings) -> dict[str, int]:
    """Data files of each table the streams read back, at the end of a run."""
    return {table: DeltaTable.forPath(spark, settings.table(table)).detail().first()["numFiles"]
            for table in maintenance.STREAM_READ_TABLES}


def batch_seconds_by_minute(spark: SparkSession, settings: Settings) -> dict[str, dict[int, float]]:
    """Median seconds of each query's micro-batches by the minute of the run they started in:
    whether batches grow as the tables do."""
    metrics = spark.read.format("delta").load(settings.table("ops/metrics"))
    first = metrics.agg(F.min(F.unix_micros("batch_started_at"))).first()[0]
    rows = metrics.groupBy(
        "feed", F.floor((F.unix_micros("batch_started_at") - F.lit(first)) / 60e6).cast("int").alias("minute"),
    ).agg(F.percentile_approx(F.col("duration_ms") / 1000, 0.5).alias("seconds")).collect()
    by_feed: dict[str, dict[int, float]] = {}
    for r in sorted(rows, key=lambda r: (r["feed"], r["minute"])):
        by_feed.setdefault(r["feed"], {})[r["minute"]] = r["seconds"]
    return by_feed


def latencies(spark: SparkSession, settings: Settings, produced: DataFrame, by_file: bool) -> dict:
    """p50/p95/p99 seconds from production to the silver commit and to gold, over every silver event."""
    metrics = spark.read.format("delta").load(settings.table("ops/metrics"))
    ends = F.col("batch_started_at") + F.make_dt_interval(secs=F.col("duration_ms") / 1000)
    gold = [(r["started"], r["ended"]) for r in metrics.filter("feed = 'gold'")
            .select(F.col("batch_started_at").alias("started"), ends.alias("ended")).collect()]
    silver = None
    for table in SILVER_TABLES:
        part = (spark.read.format("delta").load(settings.table(f"silver/{table}")).select("source", "ingest_batch")
                .join(silver_commits(spark, settings, table), "ingest_batch").withColumn("table", F.lit(table)))
        silver = part if silver is None else silver.unionByName(part)
    if by_file:  # a file's events share its name; the path prefix differs by URI scheme
        parts = F.split("source", "/")
        silver = silver.withColumn("name", F.concat_ws("/", F.element_at(parts, -2), F.element_at(parts, -1)))
        joined = silver.join(produced, "name", how="inner")
    else:
        joined = silver.join(produced, "source", how="inner")
    gold_batches = F.array(*[F.struct(F.lit(s).alias("started"), F.lit(e).alias("ended")) for s, e in gold])
    # The first gold batch that started at least 1 s after the silver commit has surely seen it.
    reached_gold = F.array_min(F.transform(
        F.filter(gold_batches, lambda g: g["started"] >= F.col("silver_at") + F.expr("INTERVAL 1 SECOND")),
        lambda g: g["ended"])) if gold else F.lit(None).cast("timestamp")  # a run without the gold query
    joined = joined.persist(StorageLevel.MEMORY_AND_DISK)  # read by the first-event pass and the aggregate
    try:
        first_produced = joined.agg(F.min(F.unix_micros("produced_at"))).first()[0]
        seconds = joined.select(
            "table",
            # The minute of the run the event was produced in: whether latency holds through a run,
            # as the JVM warms up and gold batches grow with the hour (docs/BENCHMARKS.md).
            F.floor((F.unix_micros("produced_at") - F.lit(first_produced)) / 60e6).cast("int").alias("minute"),
            (F.unix_micros("silver_at") - F.unix_micros("produced_at")).alias("to_silver"),
            (F.unix_micros(reached_gold) - F.unix_micros("produced_at")).alias("to_gold"),
        )
        quantiles = F.lit([0.5, 0.95, 0.99])
        # One pass for all events, per table (a feed with its own, longer trigger interval is a
        # small share of the events) and per minute; a row's grouping column that is NULL is the
        # one it is not grouped by.
        rows = seconds.groupingSets([["table"], ["minute"], []], "table", "minute").agg(
            F.count(F.lit(1)).alias("events"),
            F.count("to_gold").alias("in_gold"),
            F.percentile_approx("to_silver", quantiles, 10000).alias("silver"),
            F.percentile_approx("to_gold", quantiles, 10000).alias("gold"),
        ).collect()
    finally:
        joined.unpersist()
    row = next(r for r in rows if r["table"] is None and r["minute"] is None)
    to_s = lambda values: [v / 1e6 for v in values] if values else [None] * 3  # noqa: E731
    return {"events": row["events"], "in_gold": row["in_gold"], "silver": to_s(row["silver"]), "gold": to_s(row["gold"]),
            "silver_by_table": {r["table"]: to_s(r["silver"]) for r in rows if r["table"] is not None},
            "by_minute": {r["minute"]: {"events": r["events"], "silver": to_s(r["silver"]), "gold": to_s(r["gold"])}
                          for r in sorted((r for r in rows if r["minute"] is not None), key=lambda r: r["minute"])}}


def rate_options(rate: float, duration: int, event_time: str, now: dt.datetime) -> GeneratorOptions:
    """The generator's options for ``duration`` s at ``rate``: one file slot per second.

    ``live``: event time starts now and advances with the clock, as a real feed's does, so a gold
    batch covers the hour or two the last seconds fell in. ``compressed``: two days of event time
    pass in ``duration`` (a 24-minute slot per second), so every gold batch spans many hours.
    """
    impressions = int(rate * duration / EVENTS_PER_IMPRESSION)
    common = {"impressions": impressions, "gzip_every": 0, "corrupt_avro_files": 0}
    if event_time == "live":
        start = now.astimezone(dt.timezone.utc).replace(tzinfo=None, microsecond=0).isoformat()
        return GeneratorOptions(**common, start=start, days=1, files_per_day=duration, span_seconds=duration)
    days = max(1, duration // 60)
    return GeneratorOptions(**common, days=days, files_per_day=duration // days)


def fixed_rate(spark: SparkSession, base: Settings, work: str, source: str, rate: float, duration: int,
               bootstrap: str, event_time: str = "live", with_gold: bool = True) -> dict:
    """A continuous pipeline fed at ``rate`` events/s for about ``duration`` s; latencies and backlog.
    Without ``with_gold`` the correlation query does not run: ingestion has the cores to itself."""
    root = f"{work}/rate-{source}"
    shutil.rmtree(root, ignore_errors=True)
    settings = _settings(base, source, f"{root}/landing", f"{root}/lake", bootstrap, f"rate{int(time.time())}")
    options = rate_options(rate, duration, event_time, dt.datetime.now(dt.timezone.utc))
    dropper = None
    if source == "kafka":
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin.create_topics([NewTopic(t, num_partitions=3, replication_factor=1)
                                           for t in settings.conf["kafka"]["topics"].values()]).values():
            future.result(30)
        os.makedirs(settings.landing, exist_ok=True)
        Generator(options).write_creatives(settings.landing)
        publisher = _publisher(settings, rate)
        feed = threading.Thread(target=lambda: Generator(options).generate(f"{root}/truth", publisher=publisher))
        produced = lambda: publisher.sent  # noqa: E731
    else:
        Generator(options).generate(f"{root}/staged")
        os.makedirs(settings.landing, exist_ok=True)
        shutil.move(f"{root}/staged/dims", f"{settings.landing}/dims")
        for name in FEEDS:
            os.makedirs(f"{settings.landing}/{name}", exist_ok=True)
        dropper = _FileDropper(f"{root}/staged", settings.landing)
        feed = threading.Thread(target=dropper.run)
        produced = lambda: dropper.records  # noqa: E731

    failure: list[BaseException] = []

    def run_pipeline() -> None:
        try:
            pipeline.run(spark, settings, available_now=False, with_gold=with_gold)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    runner = threading.Thread(target=run_pipeline)
    runner.start()
    while len([q for q in spark.streams.active if q.name.startswith("advx_")]) < 4 and not failure:
        time.sleep(1)  # the dimension and the feed queries are up: start the clock
    feed.start()
    while produced() == 0 and feed.is_alive() and not failure:
        time.sleep(0.2)  # the Kafka producer generates its events first: start the clock at the first one sent
    started = time.monotonic()
    cpu = CpuMeter()
    cpu.start()
    backlog = []
    while feed.is_alive() or _ingested(spark, settings) < produced():
        time.sleep(5)
        backlog.append((round(time.monotonic() - started), produced() - _ingested(spark, settings)))
        if failure or time.monotonic() - started > duration * 10:
            break
    fed_for = time.monotonic() - started
    cpu_used = cpu.stop()
    if with_gold:  # let gold catch up: every event it leaves out is missing from its latencies
        waited, table_ids = time.monotonic(), correlation.silver_table_ids(spark, settings)
        while not failure and not _gold_read_all(spark, settings, table_ids) and time.monotonic() - waited < GOLD_WAIT_SECONDS:
            time.sleep(5)
    for query in spark.streams.active:
        query.stop()
    runner.join()
    if failure:
        raise failure[0]
    frame = _produced_at_kafka(spark, settings) if source == "kafka" else _produced_at_files(spark, dropper)
    result = latencies(spark, settings, frame, by_file=source == "files")
    result.update(source=source, produced=produced(), seconds=fed_for, backlog=backlog,
                  files=layout(spark, settings), batch_seconds=batch_seconds_by_minute(spark, settings), cpu=cpu_used)
    return result


def _gold_read_all(spark: SparkSession, settings: Settings, table_ids: dict[str, str]) -> bool:
    """Whether the gold query's last finished micro-batch read every silver table to its current version."""
    checkpoint = os.path.join(settings.checkpoints, "gold")
    commits = os.path.join(checkpoint, "commits")
    finished = [int(name) for name in os.listdir(commits) if name.isdigit()] if os.path.isdir(commits) else []
    if not finished:
        return False
    with open(os.path.join(checkpoint, "offsets", str(max(finished)))) as fh:
        offsets = fh.read().splitlines()
    return correlation.versions_read_by(offsets, table_ids) == backfill.silver_versions(spark, settings)


def report(capacity_rows: list, rate_results: list, rate: float, event_time: str = "live") -> str:
    lines = [f"{'run':<64} {'seconds':>8} {'events/s':>10}"]
    for name, seconds, events in capacity_rows:
        lines.append(f"{name:<64} {seconds:>8.1f} {events / seconds:>10,.0f}")
    lines.append(f"\nfixed rate {rate:,.0f} events/s, {event_time} event time: latency in seconds (p50 / p95 / p99), "
                 "backlog = produced - ingested")
    for r in rate_results:
        fmt = lambda v: " / ".join("-" if x is None else f"{x:.1f}" for x in v)  # noqa: E731
        peak = max((b for _, b in r["backlog"]), default=0)
        lines.append(f"{r['source']:<6} {r['produced']:>9,} events in {r['seconds']:.0f} s | produce->silver {fmt(r['silver'])}"
                     f" | produce->gold {fmt(r['gold'])} ({r['in_gold']:,} of {r['events']:,} in gold)"
                     f" | backlog peak {peak:,}, end {r['backlog'][-1][1] if r['backlog'] else 0:,}")
        lines.append("       produce->silver by table: " + " | ".join(
            f"{table} {fmt(values)}" for table, values in sorted(r.get("silver_by_table", {}).items())))
        lines.append("       p95 by minute produced, -> silver / -> gold: " + ", ".join(
            f"{minute}: {fmt(values['silver'][1:2])} / {fmt(values['gold'][1:2])}"
            for minute, values in sorted(r.get("by_minute", {}).items())))
        if r.get("cpu"):
            per = 1000 / max(r["produced"], 1)
            lines.append(f"       CPU until ingested: Spark JVM {r['cpu']['jvm']:.1f} s ({r['cpu']['jvm'] * per:.2f} s per 1,000"
                         f" events), benchmark's Python {r['cpu']['python']:.1f} s ({r['cpu']['python'] * per:.2f} s per 1,000)")
        lines.append("       backlog every 5 s: " + ", ".join(f"{t}s:{b:,}" for t, b in r["backlog"]))
        lines.append("       data files at the end: " + " | ".join(f"{t} {n:,}" for t, n in r.get("files", {}).items()))
        for feed, minutes in sorted(r.get("batch_seconds", {}).items()):
            lines.append(f"       median {feed} batch seconds by minute: " + ", ".join(
                f"{m}: {v:.1f}" for m, v in minutes.items()))
    return "\n".join(lines)


def main_realtime(spark: SparkSession, base: Settings, work: str, impressions: int, rate: float, duration: int,
                  bootstrap: str | None, ceiling, event_time: str = "live", sources: tuple[str, ...] = SOURCES,
                  with_gold: bool = True) -> None:
    with Broker(work, bootstrap) as broker:
        rows = capacity(spark, base, work, impressions, broker.bootstrap, ceiling, sources, with_gold)
        results = [fixed_rate(spark, base, work, source, rate, duration, broker.bootstrap, event_time, with_gold)
                   for source in sources]
    text = report(rows, results, rate, event_time)
    print("\n" + text)
    with open(os.path.join(work, "realtime.json"), "w", encoding="utf-8") as fh:
        json.dump({"capacity": rows, "fixed_rate": results}, fh, indent=2, default=str)
