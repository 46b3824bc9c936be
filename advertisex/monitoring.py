"""Per-micro-batch accounting: the counts that must add up, as an ``ops/metrics`` row, a log line and
Prometheus metrics; and the listeners that watch every query's progress (Kafka data loss, metrics)."""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.streaming import StreamingQueryListener

from advertisex import detectors
from advertisex.validation import is_valid

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
    T.StructField("ivt_rows", T.LongType()),
    T.StructField("max_event_time", T.TimestampType()),
    T.StructField("unknown_fields", T.MapType(T.StringType(), T.LongType())),
    # measure -> campaign -> count: "silver:<table>" rows the batch inserted into a silver table;
    # "gold:<column>" the newest rebuilt day's campaign_performance_daily after a gold batch, and
    # "gold:<column>_by_date" -> date -> count, a few columns over every date the batch rebuilt
    T.StructField("by_campaign", T.MapType(T.StringType(), T.MapType(T.StringType(), T.LongType()))),
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
    ivt_rows: int = 0
    max_event_time: dt.datetime | None = None  # the newest event time of the valid records
    unknown_fields: dict[str, int] = field(default_factory=dict)
    by_campaign: dict[str, dict[str, int]] = field(default_factory=dict)
    # The earliest and newest event times of the valid records (None, None without any); not in ops/metrics.
    valid_times: tuple[dt.datetime | None, dt.datetime | None] = (None, None)

    @property
    def rows_valid(self) -> int:
        return self.rows_in - self.rows_quarantined

    @property
    def rows_silver(self) -> int:
        return sum(self.silver_by_table.values())

    @property
    def duplicates_dropped(self) -> int:
        return self.rows_valid - self.rows_silver


def quality_metrics(rules: list[str], known_fields: list[str] | None) -> list[Column]:
    """The data-quality aggregates an ``observe()`` collects over a validated micro-batch while it is
    materialised: rows, quarantined rows (all and per rule, in conf order), the earliest and
    newest event times of its valid records and, for a JSON feed, how many records carry fields
    the contract does not name."""
    valid_time = F.when(is_valid(), F.col("event_time"))
    aggregates = [
        F.count(F.lit(1)).alias("rows"),
        F.count_if(F.size("reasons") > 0).alias("quarantined"),
        *[F.count_if(F.array_contains("reasons", rule)).alias(f"rule_{i}") for i, rule in enumerate(rules)],
        # Of valid records only: one quarantined record stamped in 2099 would otherwise hide the
        # lag of the whole batch (a negative lag, and no alert).
        F.max(valid_time).alias("max_event_time"),
        F.min(valid_time).alias("first_valid_time"),
    ]
    if known_fields is not None:
        aggregates.append(F.count_if(F.size(unknown_json_fields(known_fields)) > 0).alias("drifting"))
    return aggregates


def unknown_json_fields(known_fields: list[str]) -> Column:
    """Top-level keys of the raw JSON record that the contract does not name (NULL-safe: [] for
    a record that is not a JSON object)."""
    keys = F.coalesce(F.json_object_keys("raw"), F.array().cast("array<string>"))
    return F.array_except(keys, F.array(*[F.lit(name) for name in known_fields]))


def account_from_observation(feed: str, batch_id: int, observed: dict, rules: list[str]) -> BatchAccount:
    by_rule = {rule: int(observed[f"rule_{i}"]) for i, rule in enumerate(rules) if observed[f"rule_{i}"]}
    return BatchAccount(feed, batch_id, int(observed["rows"]), int(observed["quarantined"]), by_rule,
                        max_event_time=observed["max_event_time"],
                        valid_times=(observed["first_valid_time"], observed["max_event_time"]))


def count_unknown_fields(staged: DataFrame, known_fields: list[str]) -> dict[str, int]:
    """Records per unknown field name; run only when the observation saw drift, so the normal
    micro-batch pays nothing for it."""
    rows = (
        staged.select(F.explode(unknown_json_fields(known_fields)).alias("field"))
        .groupBy("field").count()
        .limit(100)  # a record full of junk keys must not flood the metrics row
        .collect()
    )
    return {row["field"]: int(row["count"]) for row in rows}


def metrics_row(account: BatchAccount, query_name: str, query_id: str, started_at: dt.datetime,
                duration_ms: int) -> tuple:
    """A feed batch's ``ops/metrics`` row, in METRICS_SCHEMA's order."""
    return (
        query_name, account.feed, query_id, account.batch_id, started_at, duration_ms,
        account.rows_in, account.rows_silver, account.rows_quarantined, account.duplicates_dropped,
        account.quarantine_by_rule, account.silver_by_table, account.ivt_rows, account.max_event_time,
        account.unknown_fields, account.by_campaign,
    )


def _json_value(value):
    # A naive datetime is the Python process's local time, as createDataFrame would read it.
    return _as_utc(value).isoformat() if isinstance(value, dt.datetime) else value


def metrics_row_frame(spark: SparkSession, row: tuple) -> DataFrame:
    """One ``ops/metrics`` row as a frame planned from a JSON literal read with METRICS_SCHEMA.
    ``createDataFrame`` of a Python list ships the row as pickled bytes in an RDD, which each write
    scans in a Spark job of its own; one-row appends took 0.32-0.37 s this way against 0.54-1.05 s
    (docs/BENCHMARKS.md)."""
    names = METRICS_SCHEMA.fieldNames()
    record = json.dumps({name: _json_value(value) for name, value in zip(names, row, strict=True)})
    parsed = F.from_json(F.lit(record), METRICS_SCHEMA, {"mode": "FAILFAST"})
    return spark.range(1).select(parsed.alias("row")).select("row.*")


def metrics_frame(spark: SparkSession, account: BatchAccount, query_name: str, query_id: str,
                  started_at: dt.datetime, duration_ms: int) -> DataFrame:
    return metrics_row_frame(spark, metrics_row(account, query_name, query_id, started_at, duration_ms))


def query_metrics_frame(spark: SparkSession, query_name: str, query_id: str, batch_id: int, started_at: dt.datetime,
                        duration_ms: int, rows_in: int, by_campaign: dict[str, dict[str, int]] | None = None
                        ) -> DataFrame:
    """The ops/metrics row of a query that is not a feed (the correlation query): feed ``gold``,
    the accounting columns, which only feeds have, left NULL."""
    row = (query_name, "gold", query_id, batch_id, started_at, duration_ms, rows_in, None, None, None, None, None,
           None, None, None, by_campaign)
    return metrics_row_frame(spark, row)


class Laps:
    """Seconds per step of a micro-batch, for its status line: ``lap(step)`` ends a step."""

    def __init__(self, started: float):
        self.seconds: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}
        self._mark = started

    def lap(self, step: str, parts: dict[str, float] | None = None) -> None:
        """End ``step``; ``parts``: the seconds of the sub-steps it ran side by side, if any."""
        now = time.monotonic()
        self.seconds[step] = now - self._mark
        self._mark = now
        if parts:
            self.parts[step] = parts

    def text(self) -> str:
        def one(step: str, seconds: float) -> str:
            parts = self.parts.get(step)
            inner = f" [{', '.join(f'{p} {s:.1f} s' for p, s in parts.items())}]" if parts else ""
            return f"{step} {seconds:.1f} s{inner}"

        return ", ".join(one(step, seconds) for step, seconds in self.seconds.items())


def status_line(account: BatchAccount, seconds: float, phases: Laps | None = None) -> str:
    """One line per micro-batch; counts only, never a record's content. ``phases``: its steps' seconds."""
    rules = ", ".join(f"{rule}={n:,}" for rule, n in sorted(account.quarantine_by_rule.items()))
    rate = account.rows_in / seconds if seconds > 0 else 0.0
    return (
        f"{account.feed} batch {account.batch_id}: {account.rows_in:,} in | "
        f"{account.rows_silver:,} silver | {account.rows_quarantined:,} quarantined"
        f"{f' ({rules})' if rules else ''} | {account.duplicates_dropped:,} duplicates | "
        f"{seconds:.1f} s ({rate:,.0f} rows/s)"
        + (f" ({phases.text()})" if phases is not None and phases.seconds else "")
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


class QueryListener(StreamingQueryListener):
    """Every query's progress: Prometheus metrics (official client) labelled by query name, the
    Kafka offsets each query skipped (logged as an alert line, counted per query), and a compact
    summary handed to ``on_progress`` (the Monitor, which only enqueues it).

    The callbacks run on the listener bus and must not block: they do arithmetic, update
    in-process metric objects and log. The HTTP endpoint serves the metrics from its own thread,
    so a scrape never waits on a micro-batch and a micro-batch never waits on a scrape.
    """

    def __init__(self, registry=None, on_progress=None, behind_ratio: float = 0.8):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.on_progress = on_progress
        self.behind_ratio = behind_ratio
        self.lost_offsets: dict[str, int] = {}
        self.terminated: set[str] = set()
        self.registry = registry or CollectorRegistry()
        labels = ["query"]
        r = self.registry
        self.input_rows = Counter("advx_query_input_rows", "Rows read by the query's sources", labels, registry=r)
        self.input_rate = Gauge("advx_query_input_rows_per_second", "Source input rate of the last batch", labels, registry=r)
        self.processed_rate = Gauge("advx_query_processed_rows_per_second", "Processing rate of the last batch",
                                    labels, registry=r)
        # Counted in batches, as the pipeline's own falling_behind detector counts: a time window
        # ("for: 3m") is two batches of a slow query and thirty of a fast one.
        self.behind = Gauge("advx_query_batches_behind", "Micro-batches in a row, up to the last, that processed "
                            "their rows slower than behind_ratio x the rate they arrived at", labels, registry=r)
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
        except Exception:  # noqa: BLE001 - a bug here must not take the listener bus down with it
            log.exception("query listener: could not record a progress event")

    def _record(self, p) -> None:
        q = p.name or str(p.id)
        self.batches.labels(q).inc()
        self.input_rows.labels(q).inc(p.numInputRows)
        self.input_rate.labels(q).set(p.inputRowsPerSecond or 0.0)
        self.processed_rate.labels(q).set(p.processedRowsPerSecond or 0.0)
        if detectors.behind(p.inputRowsPerSecond or 0.0, p.processedRowsPerSecond or 0.0, self.behind_ratio):
            self.behind.labels(q).inc()
        else:
            self.behind.labels(q).set(0)
        self.duration.labels(q).set((p.batchDuration or 0) / 1000)
        event_time = p.eventTime or {}
        if "watermark" in event_time:
            self.watermark.labels(q).set(_epoch_seconds(event_time["watermark"]))
        if "max" in event_time:
            self.lag.labels(q).set(_epoch_seconds(p.timestamp) - _epoch_seconds(event_time["max"]))
        self.dropped.labels(q).inc(sum(op.numRowsDroppedByWatermark for op in p.stateOperators))
        self.state_rows.labels(q).set(sum(op.numRowsTotal for op in p.stateOperators))
        self.state_bytes.labels(q).set(sum(op.memoryUsedBytes for op in p.stateOperators))
        lost = 0
        for source in p.sources:
            if source.description.startswith("KafkaV2"):
                skipped = kafka_offsets_lost(source.startOffset, source.endOffset, source.numInputRows)
                if skipped:
                    log.error("ALERT kafka data loss: query %s batch %d skipped %d offsets that were no longer in "
                              "Kafka (%s); failOnDataLoss is off, so the stream went on", q, p.batchId, skipped,
                              source.description)
                lost += skipped
        self.lost.labels(q).inc(lost)
        if lost:
            self.lost_offsets[q] = self.lost_offsets.get(q, 0) + lost
        if self.on_progress is not None:
            from advertisex.alerting import QueryProgress

            self.on_progress(QueryProgress(q, p.inputRowsPerSecond or 0.0, p.processedRowsPerSecond or 0.0,
                                           p.numInputRows, sum(op.numRowsDroppedByWatermark for op in p.stateOperators),
                                           lost))

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

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics on ``host:port`` from a daemon thread; returns the server (call shutdown())."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def _epoch_seconds(timestamp: str) -> float:
    """Spark's progress timestamps ('2026-11-25T10:00:00.000Z') as Unix seconds."""
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class PipelineMetrics:
    """The pipeline's own Prometheus metrics, next to the per-query ones of ``QueryListener``
    in the same registry: data quality per feed (what ``observe()`` counted in each micro-batch),
    valid rows per campaign, the day's click attribution from gold, open alerts and the detector
    thresholds (so Prometheus rules compare against the same conf values as the pipeline).

    Updated by the micro-batch handlers on the driver; each update is a few in-memory increments.
    """

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        r = registry
        self.rows_in = Counter("advx_feed_rows_in", "Records a feed received", ["feed"], registry=r)
        self.rows_silver = Counter("advx_feed_rows_silver", "Records a feed added to silver", ["feed"], registry=r)
        self.quarantined = Counter("advx_feed_rows_quarantined", "Records quarantined, per broken rule (a record "
                                   "breaking two rules counts under both)", ["feed", "rule"], registry=r)
        self.duplicates = Counter("advx_feed_duplicates_dropped", "Duplicate records dropped", ["feed"], registry=r)
        self.ivt = Counter("advx_feed_ivt_rows", "Valid records flagged as invalid traffic", ["feed"], registry=r)
        self.last_data = Gauge("advx_feed_last_data_timestamp_seconds", "When a feed's last micro-batch with "
                               "new input began", ["feed"], registry=r)
        self.event_lag = Gauge("advx_feed_event_time_lag_seconds", "Commit time of a feed's last micro-batch minus "
                               "the newest event time in it", ["feed"], registry=r)
        self.campaign_rows = Counter("advx_campaign_rows", "Valid records per silver table and campaign",
                                     ["table", "campaign_id"], registry=r)
        self.gold_clicks = Gauge("advx_gold_day_clicks", "Counted clicks of each date the last gold batch rebuilt",
                                 ["date"], registry=r)
        self.gold_unmatched = Gauge("advx_gold_day_unmatched_clicks", "Of those, clicks that matched no impression",
                                    ["date"], registry=r)
        self._gold_dates: set[str] = set()
        self.alert = Gauge("advx_alert_active", "1 while an alert of the pipeline's detectors is open",
                           ["detector", "severity", "feed", "campaign_id"], registry=r)
        self.threshold = Gauge("advx_detector_threshold", "Detector thresholds from conf (monitoring.detectors)",
                               ["name"], registry=r)

    def set_thresholds(self, detectors_conf: dict) -> None:
        for name, value in detectors_conf.items():
            self.threshold.labels(name).set(float(value))

    def record_feed(self, account: BatchAccount, committed_at: dt.datetime) -> None:
        feed = account.feed
        self.rows_in.labels(feed).inc(account.rows_in)
        self.rows_silver.labels(feed).inc(account.rows_silver)
        self.duplicates.labels(feed).inc(max(0, account.duplicates_dropped))
        self.ivt.labels(feed).inc(account.ivt_rows)
        for rule, count in account.quarantine_by_rule.items():
            self.quarantined.labels(feed, rule).inc(count)
        if account.max_event_time is not None:
            self.event_lag.labels(feed).set(committed_at.timestamp() - _as_utc(account.max_event_time).timestamp())
        for measure, campaigns in account.by_campaign.items():
            table = measure.split(":", 1)[1]
            for campaign, count in campaigns.items():
                self.campaign_rows.labels(table, campaign).inc(count)

    def record_gold(self, by_campaign: dict[str, dict[str, int]]) -> None:
        """The clicks of the dates this gold batch rebuilt; the series of dates it did not rebuild
        go (a date's figures are only current while batches rebuild it)."""
        clicks, attributed = by_campaign.get("gold:clicks_by_date", {}), by_campaign.get("gold:attributed_clicks_by_date", {})
        for day in self._gold_dates - set(clicks):
            self.gold_clicks.remove(day)
            self.gold_unmatched.remove(day)
        for day, n in clicks.items():
            self.gold_clicks.labels(day).set(n)
            self.gold_unmatched.labels(day).set(n - attributed.get(day, 0))
        self._gold_dates = set(clicks)


def _as_utc(ts: dt.datetime) -> dt.datetime:
    """Spark hands timestamps to Python as naive local time of the session; make them absolute."""
    return ts.astimezone(dt.timezone.utc) if ts.tzinfo else ts.astimezone().astimezone(dt.timezone.utc)
