"""Per-micro-batch accounting: the counts that must add up, as an ``ops/metrics`` row and a log line;
and the Kafka data-loss watch over the queries' progress."""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.streaming import StreamingQueryListener

log = logging.getLogger("advertisex")

METRICS_SCHEMA = T.StructType([
    T.StructField("query_name", T.StringType()),
    T.StructField("feed", T.StringType()),
    T.StructField("query_id", T.StringType()),
    T.StructField("batch_id", T.LongType()),
    T.StructField("batch_started_at", T.TimestampType()),
    T.StructField("duration_ms", T.LongType()),
    T.StructField("rows_in", T.LongType()),
    T.StructField("rows_silver", T.LongType()),
    T.StructField("rows_quarantined", T.LongType()),
    T.StructField("duplicates_dropped", T.LongType()),
    T.StructField("quarantine_by_rule", T.MapType(T.StringType(), T.LongType())),
    T.StructField("silver_by_table", T.MapType(T.StringType(), T.LongType())),
])


@dataclass
class BatchAccount:
    """Where the records of one micro-batch went. rows_in = silver + quarantined + duplicates."""

    feed: str
    batch_id: int
    rows_in: int = 0
    rows_quarantined: int = 0
    quarantine_by_rule: dict[str, int] = field(default_factory=dict)
    silver_by_table: dict[str, int] = field(default_factory=dict)

    @property
    def rows_valid(self) -> int:
        return self.rows_in - self.rows_quarantined

    @property
    def rows_silver(self) -> int:
        return sum(self.silver_by_table.values())

    @property
    def duplicates_dropped(self) -> int:
        return self.rows_valid - self.rows_silver


def count_staged(staged: DataFrame, rules: list[str]) -> tuple[int, int, dict[str, int]]:
    """(rows, quarantined rows, quarantined rows per rule) of a validated micro-batch, in one pass."""
    aggregates = [
        F.count(F.lit(1)).alias("rows"),
        F.count_if(F.size("reasons") > 0).alias("quarantined"),
        *[F.count_if(F.array_contains("reasons", rule)).alias(f"rule_{i}") for i, rule in enumerate(rules)],
    ]
    row = staged.agg(*aggregates).first()
    by_rule = {rule: int(row[f"rule_{i}"]) for i, rule in enumerate(rules) if row[f"rule_{i}"]}
    return int(row["rows"]), int(row["quarantined"]), by_rule


def metrics_frame(spark: SparkSession, account: BatchAccount, query_name: str, query_id: str,
                  started_at: dt.datetime, duration_ms: int) -> DataFrame:
    row = (
        query_name, account.feed, query_id, account.batch_id, started_at, duration_ms,
        account.rows_in, account.rows_silver, account.rows_quarantined, account.duplicates_dropped,
        account.quarantine_by_rule, account.silver_by_table,
    )
    return spark.createDataFrame([row], METRICS_SCHEMA)


def query_metrics_frame(spark: SparkSession, query_name: str, query_id: str, batch_id: int, started_at: dt.datetime,
                        duration_ms: int, rows_in: int) -> DataFrame:
    """The ops/metrics row of a query that is not a feed (the correlation query): feed ``gold``,
    the accounting columns, which only feeds have, left NULL."""
    row = (query_name, "gold", query_id, batch_id, started_at, duration_ms, rows_in, None, None, None, None, None)
    return spark.createDataFrame([row], METRICS_SCHEMA)


def status_line(account: BatchAccount, seconds: float) -> str:
    """One line per micro-batch; counts only, never a record's content."""
    rules = ", ".join(f"{rule}={n:,}" for rule, n in sorted(account.quarantine_by_rule.items()))
    rate = account.rows_in / seconds if seconds > 0 else 0.0
    return (
        f"{account.feed} batch {account.batch_id}: {account.rows_in:,} in | "
        f"{account.rows_silver:,} silver | {account.rows_quarantined:,} quarantined"
        f"{f' ({rules})' if rules else ''} | {account.duplicates_dropped:,} duplicates | "
        f"{seconds:.1f} s ({rate:,.0f} rows/s)"
    )


def kafka_offsets_lost(start_offset: str | None, end_offset: str | None, rows_read: int) -> int:
    """Offsets a Kafka micro-batch skipped: its offset range minus the rows it actually read.

    Without transactions or compaction a topic's offsets have no gaps, so a range of N offsets
    yields N rows; fewer means the records were gone (aged out by retention, or deleted) before the
    query read them, which Spark's ``failOnDataLoss = false`` passes over with a log line only.
    Partitions that appear for the first time (no start offset) are not counted.
    """
    start, end = _offsets(start_offset), _offsets(end_offset)
    if not start or not end:
        return 0
    planned = 0
    for topic, partitions in end.items():
        for partition, until in partitions.items():
            since = start.get(topic, {}).get(partition)
            if since is None or since < 0:
                return 0  # a new partition: its start is "earliest", which the progress does not say
            planned += until - since
    return max(0, planned - rows_read)


def _offsets(text: str | None) -> dict:
    """{topic: {partition: offset}} from a Kafka source's progress, or {} when it holds none yet."""
    try:
        offsets = json.loads(text) if text else {}
    except ValueError:
        return {}
    return offsets if isinstance(offsets, dict) else {}


class KafkaDataLossListener(StreamingQueryListener):
    """Counts offsets every Kafka query skipped, per query, and logs each loss as an alert line.

    Callbacks only do arithmetic and one log call: they run on the listener bus and must not block.
    """

    def __init__(self):
        self.lost: dict[str, int] = {}
        self.terminated: set[str] = set()

    def onQueryStarted(self, event) -> None:
        pass

    def onQueryProgress(self, event) -> None:
        try:
            self._check(event.progress)
        except Exception:  # noqa: BLE001 - a bug here must not take the listener bus down with it
            log.exception("kafka data-loss check failed for one progress event")

    def _check(self, progress) -> None:
        for source in progress.sources:
            if not source.description.startswith("KafkaV2"):
                continue
            lost = kafka_offsets_lost(source.startOffset, source.endOffset, source.numInputRows)
            if lost:
                name = progress.name or str(progress.id)
                self.lost[name] = self.lost.get(name, 0) + lost
                log.error("ALERT kafka data loss: query %s batch %d skipped %d offsets that were no longer in "
                          "Kafka (%s); failOnDataLoss is off, so the stream went on", name, progress.batchId, lost,
                          source.description)

    def onQueryIdle(self, event) -> None:
        pass

    def onQueryTerminated(self, event) -> None:
        self.terminated.add(str(event.runId))

    def wait_for(self, run_ids: list[str], timeout: float = 10.0) -> None:
        """Wait until the listener has seen these query runs end (so it has seen all their progress).
        Runs, not queries: a restarted query keeps its id and gets a new run id."""
        deadline = time.monotonic() + timeout
        while not set(run_ids) <= self.terminated and time.monotonic() < deadline:
            time.sleep(0.05)


class PrometheusListener(StreamingQueryListener):
    """Each query's progress as Prometheus metrics (official client), labelled by query name.

    The callbacks only update in-process metric objects; the HTTP endpoint serves them from its
    own thread, so a scrape never waits on a micro-batch and a micro-batch never waits on a scrape.
    """

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry or CollectorRegistry()
        labels = ["query"]
        r = self.registry
        self.input_rows = Counter("advx_query_input_rows", "Rows read by the query's sources", labels, registry=r)
        self.input_rate = Gauge("advx_query_input_rows_per_second", "Source input rate of the last batch", labels, registry=r)
        self.processed_rate = Gauge("advx_query_processed_rows_per_second", "Processing rate of the last batch",
                                    labels, registry=r)
        self.duration = Gauge("advx_query_batch_duration_seconds", "Wall time of the last micro-batch", labels, registry=r)
        self.watermark = Gauge("advx_query_watermark_timestamp_seconds", "Event-time watermark after the last batch",
                               labels, registry=r)
        self.lag = Gauge("advx_query_event_time_lag_seconds", "Batch time minus the newest event time seen",
                         labels, registry=r)
        self.dropped = Counter("advx_query_rows_dropped_by_watermark", "Rows stateful operators dropped as late",
                               labels, registry=r)
        self.state_rows = Gauge("advx_query_state_rows", "Rows held in state stores", labels, registry=r)
        self.state_bytes = Gauge("advx_query_state_memory_bytes", "Memory used by state stores", labels, registry=r)
        self.lost = Counter("advx_kafka_offsets_lost", "Kafka offsets gone before the query read them", labels,
                            registry=r)
        self.batches = Counter("advx_query_batches", "Micro-batches completed", labels, registry=r)

    def onQueryStarted(self, event) -> None:
        pass

    def onQueryProgress(self, event) -> None:
        try:
            self._record(event.progress)
        except Exception:  # noqa: BLE001 - metrics must never take the listener bus down
            log.exception("prometheus metrics: could not record a progress event")

    def _record(self, p) -> None:
        q = p.name or str(p.id)
        self.batches.labels(q).inc()
        self.input_rows.labels(q).inc(p.numInputRows)
        self.input_rate.labels(q).set(p.inputRowsPerSecond or 0.0)
        self.processed_rate.labels(q).set(p.processedRowsPerSecond or 0.0)
        self.duration.labels(q).set((p.batchDuration or 0) / 1000)
        event_time = p.eventTime or {}
        if "watermark" in event_time:
            self.watermark.labels(q).set(_epoch_seconds(event_time["watermark"]))
        if "max" in event_time:
            self.lag.labels(q).set(_epoch_seconds(p.timestamp) - _epoch_seconds(event_time["max"]))
        self.dropped.labels(q).inc(sum(op.numRowsDroppedByWatermark for op in p.stateOperators))
        self.state_rows.labels(q).set(sum(op.numRowsTotal for op in p.stateOperators))
        self.state_bytes.labels(q).set(sum(op.memoryUsedBytes for op in p.stateOperators))
        for source in p.sources:
            if source.description.startswith("KafkaV2"):
                self.lost.labels(q).inc(kafka_offsets_lost(source.startOffset, source.endOffset, source.numInputRows))

    def onQueryIdle(self, event) -> None:
        pass

    def onQueryTerminated(self, event) -> None:
        pass

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics on ``host:port`` from a daemon thread; returns the server (call shutdown())."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def _epoch_seconds(timestamp: str) -> float:
    """Spark's progress timestamps ('2026-11-25T10:00:00.000Z') as Unix seconds."""
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
