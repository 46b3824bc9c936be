"""The ingestion pipeline: one streaming query per feed (file drops or Kafka), each micro-batch through
bronze and silver.

A micro-batch of a feed is written four times: silver (the ids it does not hold yet), bronze and
quarantine side by side, then ops/metrics. Each is an append marked with the query id and batch
id, which skips a batch the table holds already, so a batch replayed after a crash changes
nothing that was already committed.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from delta.tables import DeltaTable
from prometheus_client import CollectorRegistry
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from advertisex import alerting, bronze, correlation, lake, maintenance, monitoring, parsing, silver, sources
from advertisex.config import Settings, pseudonymization_key
from advertisex.session import quiet_when_stopped
from advertisex.silver import Privacy
from advertisex.validation import (
    QUARANTINE_STATS_COLUMNS,
    filter_valid,
    is_valid,
    to_quarantine,
    with_rule_violations,
)

log = logging.getLogger("advertisex")

SilverBuilder = Callable[[DataFrame, Privacy], DataFrame]
QUARANTINE_TEXT = "_quarantine_text"  # a staged record's text in the quarantine (NULL when valid)


@dataclass(frozen=True)
class FeedSpec:
    feed: str
    silver_tables: dict[str, SilverBuilder]
    raw_text: Callable[[], Column] = lambda: F.col("raw")  # what the quarantine keeps as ``raw``


FEEDS = {
    "impressions": FeedSpec("impressions", {"impressions": silver.to_silver_impressions}),
    "clicks_conversions": FeedSpec(
        "clicks_conversions",
        {"clicks": silver.to_silver_clicks, "conversions": silver.to_silver_conversions},
    ),
    "bid_requests": FeedSpec(
        "bid_requests", {"bid_requests": silver.to_silver_bid_requests}, raw_text=parsing.bid_request_raw_text,
    ),
}


def feed_tables() -> list[str]:
    """Every table the feed queries write, but ops/metrics."""
    return [table for feed, spec in FEEDS.items()
            for table in (f"bronze/{feed}", f"quarantine/{feed}", *(f"silver/{name}" for name in spec.silver_tables))]


def stats_properties(table: str) -> dict[str, str]:
    """The table properties that say which columns' file statistics a feed table keeps."""
    layer = table.split("/", 1)[0]
    return lake.stats_only({"bronze": bronze.STATS_COLUMNS, "quarantine": QUARANTINE_STATS_COLUMNS,
                            "silver": silver.STATS_COLUMNS}[layer])


def privacy_from(settings: Settings) -> Privacy:
    denylist = settings.conf["ivt"]["denylist"]
    return Privacy(
        key=pseudonymization_key(settings),
        denylisted_users=tuple(str(u) for u in denylist["user_ids"] or ()),
        denylisted_ips=tuple(str(ip) for ip in denylist["ips"] or ()),
    )


def read_dim(spark: SparkSession, settings: Settings) -> DataFrame:
    path = settings.table("silver/dim_creatives")
    if DeltaTable.isDeltaTable(spark, path):
        return spark.read.format("delta").load(path)
    return spark.createDataFrame([], parsing.ddl_schema("dim_creatives.ddl"))


class CreativesDimension:
    """The creatives dimension as the feed batches join it: a copy in the driver's memory.

    A copy is read from silver when a batch first needs it, and again after the dimension's own
    query has merged a batch (``DimCreativesWriter`` calls ``changed``; nothing else does, so a
    copy no such writer tells stays as first read). A batch that joins the copy plans no Delta
    scan of the table and runs no job to list its files; broadcasting the copy still takes a
    job (a join measured alone: 2 jobs instead of 4, docs/BENCHMARKS.md). The table holds a
    row per creative, a few hundred: the collect is the dimension, not the data.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._changes = 0
        self._copy: tuple[int, DataFrame] | None = None

    def changed(self) -> None:
        with self._lock:
            self._changes += 1

    def frame(self, spark: SparkSession) -> DataFrame:
        with self._lock:
            if self._copy is None or self._copy[0] != self._changes:
                stored = read_dim(spark, self.settings)
                self._copy = (self._changes, spark.createDataFrame(stored.collect(), stored.schema))
            return self._copy[1]


def stage(feed: str, raw: DataFrame, dim: DataFrame, settings: Settings) -> DataFrame:
    """Parse and validate one micro-batch of a feed: every record with its ``reasons``."""
    validation = settings.conf["validation"]
    if feed == "impressions":
        parsed = raw.transform(parsing.parse_impressions).transform(silver.with_creative_dimension, dim)
    elif feed == "clicks_conversions":
        parsed = (
            raw.transform(parsing.filter_csv_headers)
            .transform(parsing.parse_clicks_conversions, validation["conversion_types"])
            .transform(silver.with_campaign_advertiser, dim)
        )
    else:
        parsed = raw.transform(parsing.parse_bid_requests)
    return parsed.transform(
        with_rule_violations,
        validation["rules"][feed],
        validation["min_event_time"],
        validation["max_future_skew"],
    )


def _is_unreadable_file(exc: Exception) -> bool:
    # Spark wraps every failure of a file reader in this error class; "Avro" alone would also
    # match an out-of-memory trace that passes through the Avro reader.
    return "FAILED_READ_FILE" in str(exc)


def _campaign_of(rows: DataFrame) -> Column:
    """The campaign a silver row counts under in a batch's account ("none" for none)."""
    campaign = "bid_campaign_id" if "bid_campaign_id" in rows.columns else "campaign_id"
    return F.coalesce(F.col(campaign), F.lit("none"))


def _campaign_counts(rows: DataFrame) -> tuple[dict[str, int], int]:
    """Rows per campaign and IVT rows of a micro-batch's silver rows (a handful of campaigns per
    batch: the collect is the metric, not the data)."""
    counts = (
        rows.groupBy(_campaign_of(rows).alias("campaign"))
        .agg(F.count(F.lit(1)).alias("rows"), F.count_if("is_ivt").alias("ivt"))
        .collect()
    )
    return {r["campaign"]: int(r["rows"]) for r in counts}, sum(int(r["ivt"]) for r in counts)


class FeedBatchWriter:
    """The foreachBatch handler of one feed's query."""

    def __init__(self, spark: SparkSession, settings: Settings, spec: FeedSpec, query_name: str, privacy: Privacy,
                 monitor: alerting.Monitor | None = None, dim: CreativesDimension | None = None):
        self.monitor = monitor
        self.dim = dim or CreativesDimension(settings)
        self.spark = spark
        self.settings = settings
        self.spec = spec
        self.query_name = query_name
        self.privacy = privacy
        self._query_id: str | None = None
        self._rules = list(settings.conf["validation"]["rules"][spec.feed])
        # The JSON feed's contract fields: any other top-level key in a record is schema drift.
        self._known_fields = ([f.name for f in parsing.ddl_schema("impressions.ddl").fields]
                              if spec.feed == "impressions" else None)

    def query_id(self) -> str:
        """The query's id, kept in its checkpoint: stable across restarts, new for a new checkpoint."""
        if self._query_id is None:
            for query in self.spark.streams.active:
                if query.name == self.query_name:
                    self._query_id = str(query.id)
        if self._query_id is None:
            raise RuntimeError(f"query {self.query_name} is not active")
        return self._query_id

    def _raw_batch(self, batch_df: DataFrame, salvage: bool) -> DataFrame:
        if "_order" in batch_df.columns:  # Kafka: the source already gives one record per row
            return batch_df
        if self.spec.feed != "bid_requests":
            return sources.with_arrival_order(batch_df)
        # The listing stream gives file names only; a batch holds at most max_files_per_trigger.
        paths = [row.path for row in batch_df.select("path").collect()]
        if not paths:
            return sources.empty_avro_batch(batch_df.sparkSession)
        read = sources.read_avro_files_isolating_corrupt if salvage else sources.read_avro_files_screened
        return read(batch_df.sparkSession, paths)

    def _staged(self, batch_df: DataFrame, batch_id: int, ingested_at: dt.datetime, salvage: bool):
        """The validated micro-batch, cached, and its account: ``observe()`` counts rows, quarantine
        per rule and the newest event time while the batch is materialised into the cache, so the
        counts cost no pass of their own."""
        spark = batch_df.sparkSession
        raw = self._raw_batch(batch_df, salvage)
        rules, known = self._rules, self._known_fields
        observation = Observation(f"advx_quality_{self.spec.feed}_{batch_id}_{uuid.uuid4().hex[:8]}")
        staged = (
            stage(self.spec.feed, bronze.with_ingestion(raw, ingested_at), self.dim.frame(spark), self.settings)
            # The decoded Avro record, a bid request's widest column, is needed after parsing only
            # for the quarantine's text of the few invalid records: that text is made here and the
            # record is not cached (docs/BENCHMARKS.md).
            .withColumn(QUARANTINE_TEXT, F.when(~is_valid(), self.spec.raw_text()))
            .drop("record")
            .observe(observation, *monitoring.quality_metrics(rules, known))
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        try:
            staged.write.format("noop").mode("overwrite").save()
            observed = observation.get
            account = monitoring.account_from_observation(self.spec.feed, batch_id, observed, rules)
            if known is not None and observed["drifting"]:
                account.unknown_fields = monitoring.count_unknown_fields(staged, known)
            return staged, account
        except Exception:
            staged.unpersist()  # the caller may retry the batch another way; drop this attempt's cache
            raise

    def __call__(self, batch_df: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        started_at = dt.datetime.now(dt.timezone.utc)
        feed = self.spec.feed
        qid = self.query_id()
        phases = monitoring.Laps(started)
        if self.monitor is not None:
            self.monitor.feed_batch_started(feed, started_at)
        try:
            staged, account = self._staged(batch_df, batch_id, started_at, salvage=False)
        except Exception as exc:
            # Only a file that cannot be read is worth a second, file-by-file attempt; anything
            # else (memory, a lost executor) fails the batch as it would for any feed.
            if feed != "bid_requests" or not _is_unreadable_file(exc):
                raise
            log.warning("%s batch %d: a file is not readable Avro (%s); reading file by file",
                        feed, batch_id, str(exc).splitlines()[0][:200])
            staged, account = self._staged(batch_df, batch_id, started_at, salvage=True)
        phases.lap("staging")
        try:
            self._write(staged, account, qid, batch_id, phases)
        finally:
            staged.unpersist()
        seconds = time.monotonic() - started
        lake.append_once(
            monitoring.metrics_frame(batch_df.sparkSession, account, self.query_name, qid, started_at, int(seconds * 1000)),
            self.settings.table("ops/metrics"), f"{qid}:ops/metrics", batch_id,
        )
        phases.lap("metrics")
        if self.monitor is not None:
            self.monitor.feed_batch(account, started_at, seconds)
        log.info(monitoring.status_line(account, time.monotonic() - started, phases))

    def _write(self, staged: DataFrame, account: monitoring.BatchAccount, qid: str, batch_id: int,
               phases: monitoring.Laps) -> None:
        """Every table's write side by side (``lake.side_by_side``): each silver table's, bronze and
        quarantine. Every write is safe to repeat, alone: a batch that fails in one of them is
        replayed whole."""
        feed, table = self.spec.feed, self.settings.table
        valid = filter_valid(staged)
        scoped = self.settings.conf["silver"]["dedup_scope"] == "batch_event_times"
        within = lake.event_times(*account.valid_times) if scoped else None
        writes = {f"silver/{name}": functools.partial(self._insert_new_rows, name, build, valid, qid, batch_id, within)
                  for name, build in self.spec.silver_tables.items()}
        writes["bronze"] = lambda: lake.append_once(bronze.to_bronze(staged), table(f"bronze/{feed}"), f"{qid}:bronze",
                                                    batch_id, bronze.BRONZE_PARTITIONS, stats_properties("bronze"))
        if account.rows_quarantined:
            writes["quarantine"] = lambda: lake.append_once(to_quarantine(staged, QUARANTINE_TEXT),
                                                            table(f"quarantine/{feed}"), f"{qid}:quarantine", batch_id,
                                                            properties=stats_properties("quarantine"))

        def timed(write):
            started = time.monotonic()
            return write(), time.monotonic() - started

        done = dict(zip(writes, lake.side_by_side([functools.partial(timed, write) for write in writes.values()]), strict=True))
        for name in self.spec.silver_tables:
            by_campaign, ivt = done[f"silver/{name}"][0]
            account.by_campaign[f"silver:{name}"] = by_campaign
            account.silver_by_table[name] = sum(by_campaign.values())
            account.ivt_rows += ivt
        phases.lap("writes", {step: seconds for step, (_, seconds) in done.items()})

    def _insert_new_rows(self, name: str, build: SilverBuilder, valid: DataFrame, qid: str, batch_id: int,
                         within: Column | None) -> tuple[dict[str, int], int]:
        """Append the batch's rows whose id silver does not hold yet (``lake.new_rows``, looking
        only in the rows ``within`` selects when it is given); return them by campaign, and how
        many of them are IVT.

        The rows are built (deduplication in the batch, user agents, pseudonyms) in the pass that
        appends them, which also counts them (``observe``). Only this query writes the table: no
        other writer can add one of the ids between the look and the append. A replayed batch
        that had committed is not appended again; its figures are read back from the rows it
        committed, by their batch tag.
        """
        path, tag = self.settings.table(f"silver/{name}"), f"{qid}:{batch_id}"
        spark = valid.sparkSession
        rows = build(valid, self.privacy).withColumn("ingest_batch", F.lit(tag))
        lake.ensure_table(spark, rows, path, silver.PARTITIONS[name], stats_properties("silver"))
        key = silver.SILVER_KEYS[name]

        def append() -> tuple[dict[str, int], int]:
            observation = Observation(f"advx_silver_{name}_{batch_id}_{uuid.uuid4().hex[:8]}")
            counted = lake.new_rows(rows, path, key, candidates=valid.select(key), within=within).observe(
                observation, F.collect_list(_campaign_of(rows)).alias("campaigns"), F.count_if("is_ivt").alias("ivt"))
            if lake.append_once(counted, path, f"{qid}:silver/{name}", batch_id, silver.PARTITIONS[name],
                                stats_properties("silver")):
                figures = observation.get
                return dict(Counter(figures["campaigns"])), int(figures["ivt"])
            return _campaign_counts(committed_rows(spark, path, tag))

        # The append reads the table (for the ids it holds), so Delta checks it against concurrent
        # commits: an OPTIMIZE that replaced files it read makes it fail, uncommitted, and it is
        # simply tried again.
        return lake.with_conflict_retries(append, on_retry=lambda n, exc: log.warning(
            "%s: append lost to a concurrent commit (%s); retry %d", path, type(exc).__name__, n))


def committed_rows(spark: SparkSession, path: str, batch_tag: str) -> DataFrame:
    """The silver rows one micro-batch inserted, whether by this run or by a run that crashed after
    its commit. The session keeps exact string statistics for tags (see ``session``), so Delta
    reads only the files whose ``ingest_batch`` range holds the tag, not the whole table."""
    return spark.read.format("delta").load(path).filter(F.col("ingest_batch") == batch_tag)


class DimCreativesWriter:
    """foreachBatch handler of the creatives dimension: upsert by creative_id; then tells the
    feeds' copy (``CreativesDimension``), if given, that the table changed."""

    def __init__(self, settings: Settings, copy: CreativesDimension | None = None):
        self.settings = settings
        self.copy = copy

    def __call__(self, batch_df: DataFrame, batch_id: int) -> None:
        spark = batch_df.sparkSession
        path = self.settings.table("silver/dim_creatives")
        rows = silver.to_dim_creatives(batch_df)
        lake.ensure_table(spark, rows, path)
        with lake.delta_transaction(spark, "dim_creatives", batch_id):
            (
                DeltaTable.forPath(spark, path).alias("t")
                .merge(rows.alias("s"), "t.creative_id = s.creative_id")
                .whenMatchedUpdateAll()
                .whenNotMatchedInsertAll()
                .execute()
            )
        if self.copy is not None:
            self.copy.changed()
        log.info("dim_creatives batch %d: merged", batch_id)


def _empty_raw(spark: SparkSession, feed: str) -> DataFrame:
    if feed == "bid_requests":
        return sources.empty_avro_batch(spark)
    return sources.with_arrival_order(spark.createDataFrame([], "raw STRING, source STRING, file_time TIMESTAMP"))


def ensure_silver_tables(spark: SparkSession, settings: Settings, privacy: Privacy) -> None:
    """Create any missing silver table, empty, with the schema the feed's batches write.

    The correlation query streams from all four; it must be able to start before every feed
    has delivered its first record.
    """
    lake.side_by_side(_silver_table_creations(spark, settings))


def _silver_table_creations(spark: SparkSession, settings: Settings) -> list[Callable[[], None]]:
    """A call per missing silver table that creates it (``ensure_silver_tables``)."""
    now = dt.datetime.now(dt.timezone.utc)
    dim = read_dim(spark, settings)
    creations = []
    for feed, spec in FEEDS.items():
        missing = {n: b for n, b in spec.silver_tables.items()
                   if not DeltaTable.isDeltaTable(spark, settings.table(f"silver/{n}"))}
        if not missing:
            continue
        valid = filter_valid(stage(feed, bronze.with_ingestion(_empty_raw(spark, feed), now), dim, settings))
        for name, build in missing.items():
            rows = build(valid, Privacy(key=b"schema-only")).withColumn("ingest_batch", F.lit(None).cast("string"))
            creations.append(functools.partial(lake.ensure_table, spark, rows, settings.table(f"silver/{name}"),
                                               silver.PARTITIONS[name], stats_properties("silver")))
    return creations


def prepare_tables(spark: SparkSession, settings: Settings) -> None:
    """The tables several queries write to or read back, created before the queries start (or
    their first commits race), with their compaction setting (``maintenance``). A feed table
    from an older release is told which columns' statistics to keep (one commit, once)."""
    metrics = spark.createDataFrame([], monitoring.METRICS_SCHEMA)
    lake.side_by_side([  # each table its own commits: a new lake's tables are created side by side
        *_silver_table_creations(spark, settings),
        functools.partial(lake.ensure_columns, spark, metrics, settings.table("ops/metrics")),
        functools.partial(correlation.ensure_tables, spark, settings),
    ])
    for table in feed_tables():
        lake.set_properties(spark, settings.table(table), stats_properties(table))
    maintenance.set_auto_compaction(spark, settings)


def trigger_interval(settings: Settings, feed: str | None = None) -> str:
    """The micro-batch interval of a feed's query (its own, if the conf gives one) or of the others."""
    streaming = settings.conf["streaming"]
    return (streaming["feed_trigger_intervals"] or {}).get(feed) or streaming["trigger_interval"]


def _start(df: DataFrame, name: str, handler, checkpoint: str, settings: Settings, available_now: bool,
           feed: str | None = None) -> StreamingQuery:
    writer = (df.writeStream.queryName(name).option("checkpointLocation", checkpoint)
              .foreachBatch(quiet_when_stopped(handler)))
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=trigger_interval(settings, feed))
    return writer.start()


def _feed_stream(spark: SparkSession, settings: Settings, feed: str) -> tuple[DataFrame, str]:
    """The feed's stream and its checkpoint folder (Kafka and file queries keep separate progress)."""
    checkpoints = settings.checkpoints.rstrip("/")
    if settings.conf["source"] == "kafka":
        return sources.read_kafka_feed(spark, settings, feed), f"{checkpoints}/kafka/{feed}"
    if feed == "bid_requests":
        return sources.read_avro_file_listing(spark, settings), f"{checkpoints}/{feed}"
    return sources.read_text_feed(spark, settings, feed), f"{checkpoints}/{feed}"


@dataclass
class Supervised:
    """A streaming query and how to start it again from its checkpoint."""

    name: str
    starter: Callable[[], StreamingQuery]
    query: StreamingQuery | None = None
    restarts: int = 0

    def start(self) -> Supervised:
        self.query = self.starter()
        return self


# Spark 4.1's Kafka source fails the first micro-batch a restarted query replays from its offset
# log, after the batch is committed, while it reports progress (SPARK-55271: ``Some(null)`` in
# KafkaMicroBatchStream.metrics; fixed in the 4.2 connector). The batch's writes and its commit
# are done, so starting the query again from its checkpoint continues exactly where it was.
_KAFKA_METRICS_NPE = 'because the return value of "scala.Option.get()" is null'
MAX_RESTARTS = 5


def restartable(supervised: Supervised) -> bool:
    exc = supervised.query.exception() if supervised.query is not None else None
    return (exc is not None and _KAFKA_METRICS_NPE in str(exc) and "IterableOps.map" in str(exc)
            and supervised.restarts < MAX_RESTARTS)


def restart(supervised: Supervised) -> None:
    supervised.restarts += 1
    log.warning("query %s hit SPARK-55271 after committing a replayed batch; restarting it from its checkpoint "
                "(restart %d of at most %d)", supervised.name, supervised.restarts, MAX_RESTARTS)
    supervised.start()


def start_ingestion_queries(spark: SparkSession, settings: Settings, available_now: bool,
                            monitor: alerting.Monitor | None = None) -> list[Supervised]:
    """Load the dimension first (so impressions can be checked against it), then start every feed.

    The creatives dimension is a file drop under the landing directory whatever the feeds' source;
    with Kafka and no landing directory, the dimension already in silver is used as it is.
    """
    privacy = privacy_from(settings)
    checkpoints = settings.checkpoints.rstrip("/")
    dim = CreativesDimension(settings)

    def dim_query(once: bool) -> StreamingQuery:
        return _start(sources.read_dim_creatives(spark, settings), "advx_dim_creatives",
                      DimCreativesWriter(settings, dim), f"{checkpoints}/dim_creatives", settings, available_now=once)

    def feed_query(feed: str) -> StreamingQuery:
        stream, checkpoint = _feed_stream(spark, settings, feed)
        handler = FeedBatchWriter(spark, settings, FEEDS[feed], f"advx_{feed}", privacy, monitor, dim)
        return _start(stream, f"advx_{feed}", handler, checkpoint, settings, available_now, feed)

    if settings.landing is not None:
        sources.check_landing(settings)
        dim_query(once=True).awaitTermination()
    queries: list[Supervised] = []
    try:
        if settings.landing is not None and not available_now:
            queries.append(Supervised("advx_dim_creatives", lambda: dim_query(once=False)).start())
        for feed in FEEDS:
            queries.append(Supervised(f"advx_{feed}", lambda feed=feed: feed_query(feed)).start())
    except Exception:
        for supervised in queries:
            supervised.query.stop()
        raise
    return queries


def _await_all(queries: list[Supervised]) -> None:
    """availableNow: wait for every query, restarting one that hit SPARK-55271 (it resumes its run)."""
    for supervised in queries:
        while True:
            try:
                supervised.query.awaitTermination()
            except Exception:  # noqa: BLE001 - the failure is in query.exception(), judged below
                pass
            if not restartable(supervised):
                break
            restart(supervised)


def _await_any_failure(spark: SparkSession, queries: list[Supervised]) -> None:
    """Continuous: run until a query ends for a reason other than SPARK-55271."""
    while True:
        # A query that terminated before (the dimension's first, availableNow pass; a restarted
        # query's failed run) would make awaitAnyTermination return at once.
        spark.streams.resetTerminated()
        try:
            spark.streams.awaitAnyTermination()
        except Exception:  # noqa: BLE001 - judged per query below
            pass
        ended = [s for s in queries if not s.query.isActive]
        if ended and all(restartable(s) for s in ended):
            for supervised in ended:
                restart(supervised)
            continue
        for supervised in ended:
            exc = supervised.query.exception()
            reason = str(exc).splitlines()[0][:500] if exc else "it stopped"
            log.error("query %s ended, stopping the others: %s", supervised.name, reason)
        return


def run(spark: SparkSession, settings: Settings, available_now: bool, timings: dict | None = None,
        with_gold: bool = True) -> dict:
    """Ingestion queries (files or Kafka -> bronze/silver), then the correlation query (silver -> gold).

    With ``available_now`` the correlation query starts once ingestion has finished, so that its
    one pass sees all of silver; otherwise all queries run side by side until one fails. Without
    ``with_gold`` ingestion alone runs (the benchmark's ceiling comparison and sustained rate).
    Returns what was lost on the way, for the caller to act on: Kafka offsets skipped per query
    and rows the correlation's watermark dropped.
    """
    started = time.monotonic()
    prepare_tables(spark, settings)
    registry = CollectorRegistry()
    monitor = alerting.Monitor(spark, settings, monitoring.PipelineMetrics(registry), continuous=not available_now)
    listener = monitoring.QueryListener(registry, on_progress=monitor.progress,
                                        behind_ratio=settings.conf["monitoring"]["detectors"]["behind_ratio"])
    spark.streams.addListener(listener)
    monitoring_conf = settings.conf["monitoring"]
    endpoint = (listener.serve(monitoring_conf["prometheus_port"], monitoring_conf["prometheus_host"])
                if monitoring_conf["prometheus_port"] else None)
    monitor.start()
    monitor.expect_feeds(FEEDS)
    queries: list[Supervised] = []
    run_ids: list[str] = []
    try:
        queries = start_ingestion_queries(spark, settings, available_now, monitor)
        gold = Supervised(correlation.QUERY_NAME,
                          lambda: correlation.start(spark, settings, available_now, monitor=monitor))
        if available_now:
            _await_all(queries)
            _raise_if_failed(queries)
            ingested = time.monotonic()
            if with_gold:
                queries.append(gold.start())
                _await_all([gold])
            if timings is not None:
                timings.update(ingestion=ingested - started, gold=time.monotonic() - ingested)
        else:
            if with_gold:
                queries.append(gold.start())
            _await_any_failure(spark, queries)
    finally:
        for supervised in queries:
            if supervised.query.isActive:
                supervised.query.stop()
            run_ids.append(str(supervised.query.runId))
        listener.wait_for(run_ids)
        spark.streams.removeListener(listener)
        monitor.stop()
        if endpoint is not None:
            endpoint.shutdown()
    _raise_if_failed(queries)
    dropped = correlation.dropped_by_watermark(gold.query) if gold.query is not None else 0
    if dropped:
        log.warning("correlation: %d rows arrived after the watermark and were not joined by the stream; "
                    "backfill their dates for exact gold", dropped)
    return {"kafka_offsets_lost": dict(listener.lost_offsets), "dropped_by_watermark": dropped, "metrics": registry,
            "open_alerts": [alert for alert, _ in monitor.book.open.values()]}


def _raise_if_failed(queries: list[Supervised]) -> None:
    failed = [f"{s.name} ({str(s.query.exception()).splitlines()[0][:300]})"
              for s in queries if s.query.exception() is not None]
    if failed:
        raise RuntimeError(f"streaming queries failed: {'; '.join(failed)}")
