"""The streaming correlation query: silver streams -> stream-stream joins -> gold.

One query reads the four silver tables as Delta streams. Watermarked stream-stream joins (the
``attribution`` candidate functions, with a bound on every join so state is evicted) find each
event's candidates as both sides arrive; the candidates are kept in ``gold/_candidates``. Every
micro-batch then rebuilds the gold rows of the event dates it touched from silver and the
accumulated candidates, with the same ``gold.build`` the backfill uses. Because that last step
sees all candidates of an event at once, "latest wins", "none" and the IVT exclusions are exact
at the end of every micro-batch, including the last one of a finite ``availableNow`` run; no
answer waits in state for a watermark that a finite run never advances.

What the stream cannot see is a pair whose later event reached silver after the watermark had
evicted the other one. Those rows count in ``numRowsDroppedByWatermark`` (or never find a
partner); the events are in silver, and the backfill of their dates restores the exact result.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from advertisex import attribution, backfill, gold, lake, monitoring
from advertisex.attribution import Windows
from advertisex.config import Settings

log = logging.getLogger("advertisex")

QUERY_NAME = "advx_gold"
CANDIDATES_TABLE = "gold/_candidates"
CANDIDATE_SCHEMA = (
    "kind STRING, event_id STRING, event_date DATE, campaign_id STRING, match_id STRING, "
    "match_time TIMESTAMP, match_cost DECIMAL(18,6)"
)
_TOUCH = "touch"


def read_silver_stream(spark: SparkSession, settings: Settings, table: str) -> DataFrame:
    return (
        spark.readStream.format("delta")
        .option("maxFilesPerTrigger", settings.conf["correlation"]["max_files_per_trigger"])
        .load(settings.table(f"silver/{table}"))
    )


def _touched(df: DataFrame, campaign: str = "campaign_id") -> DataFrame:
    """A row per new event, saying which date it may change (no join, so never late)."""
    return df.select(
        F.lit(_TOUCH).alias("kind"), F.lit(None).cast("string").alias("event_id"), "event_date",
        F.col(campaign).alias("campaign_id"), F.lit(None).cast("string").alias("match_id"),
        F.lit(None).cast("timestamp").alias("match_time"), F.lit(None).cast("decimal(18,6)").alias("match_cost"),
    )


def correlation_stream(spark: SparkSession, settings: Settings) -> DataFrame:
    """Candidates from the stream-stream joins, plus one row per new silver event."""
    windows = Windows.from_conf(settings.conf)
    watermark = settings.conf["correlation"]["watermark"]
    s = {name: read_silver_stream(spark, settings, name) for name in gold.SILVER_TABLES}
    candidates = (
        attribution.click_candidates(s["clicks"], s["impressions"], windows, watermark, bounded=True)
        .unionByName(attribution.conversion_candidates(s["conversions"], s["clicks"], s["impressions"], windows, watermark))
        .unionByName(attribution.win_candidates(s["bid_requests"], s["impressions"], windows, watermark))
    )
    return (
        candidates.unionByName(_touched(s["impressions"]))
        .unionByName(_touched(s["clicks"]))
        .unionByName(_touched(s["conversions"]))
        .unionByName(_touched(s["bid_requests"], campaign="bid_campaign_id"))
    )


def read_candidates(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date) -> DataFrame:
    return (
        spark.read.format("delta").load(settings.table(CANDIDATES_TABLE))
        .filter(F.col("event_date").between(F.lit(first), F.lit(last)))
    )


def versions_read_by(offsets: list[str], table_ids: dict[str, str]) -> dict[str, int] | None:
    """The silver version of each table that a micro-batch has read completely, from the batch's
    entry in the query's offset log (``offsets``: its lines), or None if a table is missing.

    A Delta source's end offset (V, index) means: every version before V read, and of V either
    nothing (index -1) or some files. Either way V - 1 is the last whole version (0 is the empty
    table every silver table starts as).
    """
    ends: dict[str, int] = {}
    for line in offsets[2:]:  # "v1", then the batch's metadata, then one offset per source
        if line.strip() == "-":  # a source that has no offset yet
            continue
        offset = json.loads(line)
        table = offset.get("reservoirId")
        if table is not None:
            ends[table] = min(ends.get(table, offset["reservoirVersion"]), offset["reservoirVersion"])
    if not all(table_id in ends for table_id in table_ids.values()):
        return None
    return {name: max(ends[table_id] - 1, 0) for name, table_id in table_ids.items()}


class GoldBatchWriter:
    """foreachBatch of the correlation query: keep the candidates, rebuild the touched dates."""

    def __init__(self, spark: SparkSession, settings: Settings, checkpoint: str, monitor=None):
        self.spark = spark  # the session that started the query (a batch's session lists no queries)
        self.settings = settings
        self.checkpoint = checkpoint
        self.monitor = monitor
        self._query_id: str | None = None
        self._table_ids: dict[str, str] | None = None

    def silver_versions(self, spark: SparkSession, batch_id: int) -> dict[str, int]:
        """The silver versions this micro-batch's streams read to, so that the gold it rebuilds holds
        no event whose candidates the joins have not looked for yet. The current versions instead
        overshoot: the correlation stream reads at most max_files_per_trigger files a batch and can
        trail silver by several commits (the wins-without-bid-request check then saw impressions
        whose bid request was in silver but not yet joined)."""
        if self._table_ids is None:
            self._table_ids = {name: DeltaTable.forPath(spark, self.settings.table(f"silver/{name}")).detail().first()["id"]
                               for name in gold.SILVER_TABLES}
        try:
            offsets = [r.value for r in spark.read.text(f"{self.checkpoint.rstrip('/')}/offsets/{batch_id}").collect()]
            versions = versions_read_by(offsets, self._table_ids)
        except Exception:  # noqa: BLE001 - an unreadable offset log: fall back to silver as it is now
            log.warning("gold batch %d: no readable offset log entry; using silver as of now", batch_id, exc_info=True)
            versions = None
        return versions if versions is not None else backfill.silver_versions(spark, self.settings)

    def query_id(self) -> str:
        if self._query_id is None:
            self._query_id = next(str(q.id) for q in self.spark.streams.active if q.name == QUERY_NAME)
        return self._query_id

    def __call__(self, batch_df: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        started_at = dt.datetime.now(dt.timezone.utc)
        spark = batch_df.sparkSession
        versions = self.silver_versions(spark, batch_id)
        batch = batch_df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            candidates = batch.filter(F.col("kind") != _TOUCH)
            lake.append_once(candidates, self.settings.table(CANDIDATES_TABLE), f"{self.query_id()}:candidates",
                             batch_id, ["event_date"])
            dates = sorted(r["event_date"] for r in batch.select("event_date").distinct().collect()
                           if r["event_date"] is not None)
            found, rows = candidates.count(), batch.count()
        finally:
            batch.unpersist()
        dates = affected_dates(dates)
        for first, last in date_runs(dates):
            backfill.rebuild(spark, self.settings, first, last, multi_touch=False, silver_versions=versions,
                             candidates_of=lambda silver, since, last=last: read_candidates(spark, self.settings, since, last))
        figures = day_figures(spark, self.settings, dates[-1], versions) if dates else {}
        seconds = time.monotonic() - started
        # One ops/metrics row per gold batch too: its end is when this batch's events reached gold.
        lake.append_once(
            monitoring.query_metrics_frame(spark, QUERY_NAME, self.query_id(), batch_id, started_at,
                                           int(seconds * 1000), rows, figures or None),
            self.settings.table("ops/metrics"), f"{self.query_id()}:ops/metrics", batch_id,
        )
        if self.monitor is not None and figures:
            self.monitor.gold_batch(figures)
        log.info("gold batch %d: %d new candidates, dates %s rebuilt in %.1f s", batch_id, found,
                 ", ".join(d.isoformat() for d in dates) or "none", seconds)


_DAY_FIGURES = ("impressions", "clicks", "attributed_clicks", "conversions")


def day_figures(spark: SparkSession, settings: Settings, day: dt.date, versions: dict[str, int]
                ) -> dict[str, dict[str, int]]:
    """The cross-feed checks' input after a gold batch, as {"gold:<measure>": {campaign: n}}:
    each campaign's counts on ``day`` from campaign_performance_daily (a row per campaign), and
    the day's settled auctions (``settled_auctions``)."""
    rows = (
        spark.read.format("delta").load(settings.table("gold/campaign_performance_daily"))
        .filter(F.col("event_date") == F.lit(day))
        .select("campaign_id", *_DAY_FIGURES)
        .collect()
    )
    figures = {f"gold:{name}": {r["campaign_id"]: int(r[name] or 0) for r in rows} for name in _DAY_FIGURES}
    figures.update(settled_auctions(spark, settings, day, versions))
    return figures


def settled_auctions(spark: SparkSession, settings: Settings, day: dt.date, versions: dict[str, int]
                     ) -> dict[str, dict[str, int]]:
    """Impressions won in an auction, and bid requests won, over the day's settled hours: the
    hours that end a bid-request window before the newest bid request in silver. Later
    impressions may still be waiting for their bid request from the other feed; judging them
    would raise "wins without a bid request" for every batch in which the impressions' query
    commits before the bid requests' one. Non-IVT on both sides, as the bid funnel counts."""
    def silver(name):
        return (
            spark.read.format("delta").option("versionAsOf", versions[name]).load(settings.table(f"silver/{name}"))
            .filter((F.col("event_date") == F.lit(day)) & ~F.col("is_ivt"))
        )

    window = attribution.interval(Windows.from_conf(settings.conf).bid_request)
    settled = (
        silver("bid_requests").agg((F.max("event_time") - window).alias("until"))
        .select(F.to_date("until").alias("date"), F.hour("until").alias("hour"))  # in the session's UTC
        .first()
    )
    if settled["date"] != day:
        return {}  # no bid request yet, or none settled on this day
    hours = F.col("event_hour") < F.lit(settled["hour"])
    won_impressions = silver("impressions").filter(hours & F.col("auction_id").isNotNull()).count()
    wins = (
        spark.read.format("delta").load(settings.table("gold/bid_funnel_hourly"))
        .filter((F.col("event_date") == F.lit(day)) & hours)
        .agg(F.sum("wins")).first()[0]
    )
    return {"gold:won_impressions": {"*": won_impressions}, "gold:wins": {"*": int(wins or 0)}}


def affected_dates(touched: list[dt.date]) -> list[dt.date]:
    """The touched dates, plus the day after each when the batch reaches it: a click or an
    impression can change the touch of a conversion up to 24 h later. (A change to a day whose
    next day this batch does not reach is left to the backfill: rebuilding tomorrow every batch
    would cost a rebuild for nothing.)"""
    if not touched:
        return []
    latest = max(touched)
    following = {d + dt.timedelta(days=1) for d in touched if d + dt.timedelta(days=1) <= latest}
    return sorted(set(touched) | following)


def date_runs(dates: list[dt.date]) -> list[tuple[dt.date, dt.date]]:
    """Consecutive dates as (first, last) runs: one late event from last month does not make the
    batch rebuild every day since."""
    runs: list[tuple[dt.date, dt.date]] = []
    for date in sorted(dates):
        if runs and date - runs[-1][1] == dt.timedelta(days=1):
            runs[-1] = (runs[-1][0], date)
        else:
            runs.append((date, date))
    return runs


def ensure_tables(spark: SparkSession, settings: Settings) -> None:
    path = settings.table(CANDIDATES_TABLE)
    if not DeltaTable.isDeltaTable(spark, path):
        lake.ensure_table(spark, spark.createDataFrame([], CANDIDATE_SCHEMA), path, ["event_date"])


def start(spark: SparkSession, settings: Settings, available_now: bool, checkpoint: str | None = None,
          monitor=None) -> StreamingQuery:
    ensure_tables(spark, settings)
    checkpoint = checkpoint or f"{settings.checkpoints.rstrip('/')}/gold"
    writer = (
        correlation_stream(spark, settings).writeStream
        .queryName(QUERY_NAME)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(GoldBatchWriter(spark, settings, checkpoint, monitor))
    )
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=settings.conf["streaming"]["trigger_interval"])
    return writer.start()


def state_rows(query: StreamingQuery) -> int:
    """State rows held by the query's stateful operators after its last micro-batch."""
    last = query.lastProgress
    return sum(op["numRowsTotal"] for op in last["stateOperators"]) if last else 0


def dropped_by_watermark(query: StreamingQuery) -> int:
    """Rows the query's stateful operators dropped as too late, over its recent progress."""
    return sum(op.numRowsDroppedByWatermark for p in query.recentProgress for op in p.stateOperators)
