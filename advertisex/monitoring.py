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
        self.terminated.add(str(event.id))

    def wait_for(self, query_ids: list[str], timeout: float = 10.0) -> None:
        """Wait until the listener has seen these queries end (so it has seen all their progress)."""
        deadline = time.monotonic() + timeout
        while not set(query_ids) <= self.terminated and time.monotonic() < deadline:
            time.sleep(0.05)
