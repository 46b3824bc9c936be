"""The streaming correlation query: silver streams -> stream-stream joins -> gold.

One query reads the four silver tables as Delta streams. Watermarked stream-stream joins (the
``attribution`` candidate functions, with a bound on every join so state is evicted) find each
event's candidates as both sides arrive; the candidates are kept in ``gold/_candidates``. Every
micro-batch then rebuilds the gold rows of the hours of event time it can change
(``affected_hours``) from silver and the accumulated candidates, with the same ``gold.built`` the
backfill uses. Because that last step sees all candidates of an event at once, "latest wins",
"none" and the IVT exclusions are exact at the end of every micro-batch, including the last one
of a finite ``availableNow`` run; no answer waits in state for a watermark that a finite run never
advances.

What the stream cannot see is a pair whose later event reached silver after the watermark had
evicted the other one. Those rows count in ``numRowsDroppedByWatermark`` (or never find a
partner); the events are in silver, and the backfill of their dates restores the exact result.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
from urllib.parse import unquote

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from advertisex import attribution, backfill, gold, lake, monitoring
from advertisex.attribution import Windows
from advertisex.config import Settings, parse_interval
from advertisex.session import quiet_when_stopped
from advertisex.silver import SILVER_KEYS

log = logging.getLogger("advertisex")

QUERY_NAME = "advx_gold"
CANDIDATES_TABLE = "gold/_candidates"
CANDIDATE_SCHEMA = (
    "kind STRING, event_id STRING, event_date DATE, campaign_id STRING, match_id STRING, "
    "match_time TIMESTAMP, match_cost DECIMAL(18,6)"
)
_NEW = "new_"  # kind prefix of the rows that stand for a batch's new silver events, not candidates
_PINNED = "pinned_"  # kind prefix of events an earlier batch read but left out of its gold
_CLICK_KINDS = [f"{_NEW}clicks", f"{_PINNED}clicks", attribution.CLICK_BY_ID, attribution.CLICK_BY_WINDOW]


def read_silver_stream(spark: SparkSession, settings: Settings, table: str) -> DataFrame:
    return (
        spark.readStream.format("delta")
        .option("maxFilesPerTrigger", settings.conf["correlation"]["max_files_per_trigger"])
        .load(settings.table(f"silver/{table}"))
    )


def _touched(df: DataFrame, feed: str, event_id: str = "event_id", campaign: str = "campaign_id") -> DataFrame:
    """A row per new event, saying which hour it may change (no join, so never late)."""
    return df.select(
        F.lit(f"{_NEW}{feed}").alias("kind"), F.col(event_id).alias("event_id"), "event_date",
        F.col(campaign).alias("campaign_id"), F.lit(None).cast("string").alias("match_id"),
        F.lit(None).cast("timestamp").alias("match_time"), F.lit(None).cast("decimal(18,6)").alias("match_cost"),
        "event_time",
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
        candidates.unionByName(_touched(s["impressions"], "impressions", event_id="impression_id"))
        .unionByName(_touched(s["clicks"], "clicks"))
        .unionByName(_touched(s["conversions"], "conversions"))
        .unionByName(_touched(s["bid_requests"], "bid_requests", event_id="auction_id", campaign="bid_campaign_id"))
    )


def read_candidates(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date) -> DataFrame:
    return (
        spark.read.format("delta").load(settings.table(CANDIDATES_TABLE))
        .filter(F.col("event_date").between(F.lit(first), F.lit(last)))
    )


def _source_offsets(offsets: list[str]) -> list[dict]:
    """The Delta sources' end offsets in a batch's entry of the query's offset log (its lines)."""
    ends = []
    for line in offsets[2:]:  # "v1", then the batch's metadata, then one offset per source
        if line.strip() == "-":  # a source that has no offset yet
            continue
        offset = json.loads(line)
        if offset.get("reservoirId") is not None:
            ends.append(offset)
    return ends


def versions_read_by(offsets: list[str], table_ids: dict[str, str]) -> dict[str, int] | None:
    """The silver version of each table that a micro-batch has read completely, from the batch's
    entry in the query's offset log (``offsets``: its lines), or None if a table is missing.

    A Delta source's end offset (V, index) means: every version before V read, and of V either
    nothing (index -1) or some files. Either way V - 1 is the last whole version (0 is the empty
    table every silver table starts as).
    """
    ends: dict[str, int] = {}
    for offset in _source_offsets(offsets):
        table = offset["reservoirId"]
        ends[table] = min(ends.get(table, offset["reservoirVersion"]), offset["reservoirVersion"])
    if not all(table_id in ends for table_id in table_ids.values()):
        return None
    return {name: max(ends[table_id] - 1, 0) for name, table_id in table_ids.items()}


def silver_table_ids(spark: SparkSession, settings: Settings) -> dict[str, str]:
    """Each silver table's Delta id, by name: how a query's offset log names the tables it reads."""
    return {name: DeltaTable.forPath(spark, settings.table(f"silver/{name}")).detail().first()["id"]
            for name in gold.SILVER_TABLES}


def partly_read(offsets: list[str], table_ids: dict[str, str]) -> dict[str, set[int]]:
    """The versions a batch's sources stopped inside (index not -1), by table: their first files'
    events reached the batch, but its gold was pinned to the version before."""
    names = {table_id: name for name, table_id in table_ids.items()}
    partial: dict[str, set[int]] = {}
    for offset in _source_offsets(offsets):
        name = names.get(offset["reservoirId"])
        if name is not None and offset.get("index", -1) != -1:
            partial.setdefault(name, set()).add(offset["reservoirVersion"])
    return partial


def events_added_in(spark: SparkSession, path: str, name: str, version: int) -> DataFrame:
    """The events one commit added to a silver table (kind, event_id, event_date, event_time), read
    from the data files its log entry adds."""
    entry = spark.read.json(f"{path.rstrip('/')}/_delta_log/{version:020d}.json")
    files = ([] if "add" not in entry.columns else
             [f"{path.rstrip('/')}/{unquote(r['path'])}"
              for r in entry.filter(F.col("add.dataChange")).select("add.path").collect()])
    if not files:
        return spark.createDataFrame([], "kind STRING, event_id STRING, event_date DATE, event_time TIMESTAMP")
    return spark.read.parquet(*files).select(
        F.lit(f"{_PINNED}{name}").alias("kind"), F.col(SILVER_KEYS[name]).alias("event_id"),
        F.to_date("event_time").alias("event_date"), "event_time",
    )


class GoldBatchWriter:
    """foreachBatch of the correlation query: keep the candidates, rebuild the hours they change."""

    def __init__(self, spark: SparkSession, settings: Settings, checkpoint: str, monitor=None):
        self.spark = spark  # the session that started the query (a batch's session lists no queries)
        self.settings = settings
        self.checkpoint = checkpoint
        self.monitor = monitor
        self._query_id: str | None = None
        self._table_ids: dict[str, str] | None = None
        self._whole_dates: set[dt.date] | None = None
        self._auctions = SettledAuctions()

    def offsets(self, spark: SparkSession, batch_id: int) -> list[str] | None:
        """The lines of a batch's entry in the query's offset log, or None if it cannot be read."""
        try:
            return [r.value for r in spark.read.text(f"{self.checkpoint.rstrip('/')}/offsets/{batch_id}").collect()]
        except Exception:  # noqa: BLE001 - purged, or never written
            log.warning("gold batch %d: no readable offset log entry", batch_id, exc_info=True)
            return None

    def silver_versions(self, spark: SparkSession, batch_id: int) -> dict[str, int]:
        """The silver versions this micro-batch's streams read to, so that the gold it rebuilds holds
        no event whose candidates the joins have not looked for yet. The current versions instead
        overshoot: the correlation stream reads at most max_files_per_trigger files a batch and can
        trail silver by several commits (the wins-without-bid-request check then saw impressions
        whose bid request was in silver but not yet joined)."""
        if self._table_ids is None:
            self._table_ids = silver_table_ids(spark, self.settings)
        offsets = self.offsets(spark, batch_id)
        versions = versions_read_by(offsets, self._table_ids) if offsets is not None else None
        if versions is None:
            log.warning("gold batch %d: using silver as of now", batch_id)
        return versions if versions is not None else backfill.silver_versions(spark, self.settings)

    def pinned_out(self, spark: SparkSession, batch_id: int, versions: dict[str, int]) -> list[DataFrame]:
        """Events the previous batch read but left out of its gold: it stopped inside a silver
        version and pinned gold to the one before. Once this batch's pin reaches that version,
        their hours are this batch's to rebuild. (From the offset log, so a restart keeps them.)"""
        previous = self.offsets(spark, batch_id - 1) if batch_id > 0 else None
        if previous is None:
            return []
        return [events_added_in(spark, self.settings.table(f"silver/{name}"), name, version)
                for name, partial in sorted(partly_read(previous, self._table_ids).items())
                for version in sorted(partial) if versions[name] >= version]

    def query_id(self) -> str:
        if self._query_id is None:
            self._query_id = next(str(q.id) for q in self.spark.streams.active if q.name == QUERY_NAME)
        return self._query_id

    def whole_dates(self, spark: SparkSession) -> set[dt.date]:
        """Dates with daily rows but no hourly parts: gold written before the daily table was
        aggregated from parts. Their next rebuild covers all 24 hours, which completes their parts."""
        def dates_of(table: str) -> DataFrame | None:
            path = self.settings.table(f"gold/{table}")
            if not DeltaTable.isDeltaTable(spark, path):
                return None
            return spark.read.format("delta").load(path).select("event_date").distinct()

        daily, parts = dates_of(gold.DAILY_TABLE), dates_of(gold.PARTS_TABLE)
        if daily is None:
            return set()
        if parts is not None:
            daily = daily.join(parts, on="event_date", how="left_anti")
        return {r["event_date"] for r in daily.collect()}

    def __call__(self, batch_df: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        started_at = dt.datetime.now(dt.timezone.utc)
        phases = monitoring.Laps(started)
        spark = batch_df.sparkSession
        versions = self.silver_versions(spark, batch_id)
        if self._whole_dates is None:
            self._whole_dates = self.whole_dates(spark)
        pinned_out = self.pinned_out(spark, batch_id, versions)
        phases.lap("versions")
        loaded = None
        batch = batch_df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            rows, found, hours = batch.count(), 0, {}
            if rows:  # an empty batch (one that only moves the watermark) has nothing to keep
                candidates = batch.filter(~F.col("kind").startswith(_NEW)).select(*attribution.CANDIDATE_COLUMNS)
                lake.append_once(candidates, self.settings.table(CANDIDATES_TABLE), f"{self.query_id()}:candidates",
                                 batch_id, ["event_date"])
                found = candidates.count()
            phases.lap("joins")
            if rows or pinned_out:
                events = batch.select("kind", "event_id", "event_date", "event_time")
                for frame in pinned_out:
                    events = events.unionByName(frame)
                # The pinned versions' snapshots, built once for the batch's three readers of silver.
                loaded = backfill.load_silver(spark, self.settings, versions)
                hours = affected_hours(spark, self.settings, events, versions, loaded)
        finally:
            batch.unpersist()
        phases.lap("hours")
        for date in self._whole_dates & set(hours):
            hours[date] = list(range(24))
        dates = sorted(hours)
        for first, last in date_runs(dates):
            backfill.rebuild(spark, self.settings, first, last, multi_touch=False, silver_versions=versions,
                             candidates_of=lambda silver, since, last=last: read_candidates(spark, self.settings, since, last),
                             hours={d: h for d, h in hours.items() if first <= d <= last}, loaded=loaded)
        self._whole_dates -= set(dates)
        phases.lap("rebuild")
        figures = day_figures(spark, self.settings, dates, loaded, self._auctions, hours[dates[-1]]) if dates else {}
        phases.lap("figures")
        seconds = time.monotonic() - started
        # One ops/metrics row per gold batch too: its end is when this batch's events reached gold.
        lake.append_once(
            monitoring.query_metrics_frame(spark, QUERY_NAME, self.query_id(), batch_id, started_at,
                                           int(seconds * 1000), rows, figures or None),
            self.settings.table("ops/metrics"), f"{self.query_id()}:ops/metrics", batch_id,
        )
        if self.monitor is not None and figures:
            self.monitor.gold_batch(figures)
        log.info("gold batch %d: %d new candidates, %d hours of dates %s rebuilt in %.1f s (%s)", batch_id, found,
                 sum(len(h) for h in hours.values()), ", ".join(d.isoformat() for d in dates) or "none", seconds,
                 phases.text())


def affected_hours(spark: SparkSession, settings: Settings, events: DataFrame, versions: dict[str, int],
                   loaded: dict[str, DataFrame] | None = None) -> dict[dt.date, list[int]]:
    """The hours of event time whose gold rows a micro-batch can change, by date. ``events``: the
    batch's rows (kind, event_id, event_date, event_time), new silver events and new candidates.
    - the hours of its new events, and of the events it found new candidates for;
    - for each such click, the hours of the same user's clicks up to ``repeat_click`` after it
      (whether they repeat it may change);
    - the hours of the conversions that have one of those clicks as a candidate (their touch may
      change with the click's verdict or impression);
    - for an impression an earlier batch left out of its gold (kind ``pinned_impressions``), the
      clicks and conversions attributed to it: they were rebuilt without its website, country and
      device. (A new impression's are in the batch already, as its candidates.)

    Only the ``affected_dates`` of the batch's event dates count. ``loaded``: silver at
    ``versions``, as ``backfill.load_silver`` gives it (loaded here if not given).

    When every changed click is one of the batch's own events (no ``pinned_impressions``, whose
    referring clicks may lie anywhere in the dates), the clicks, candidates and conversions are
    read only from the earliest of those clicks on: a follower lies at most ``repeat_click`` after
    its click, and a conversion after the click it may touch. Delta then skips the files of the
    day's earlier events by their event-time statistics; without the bound, each batch read the
    whole of its dates, which grows all day.
    """
    events = events.filter(F.col("event_time").isNotNull())
    is_click = F.col("kind").isin(*_CLICK_KINDS)
    # One job says which dates the batch holds, which lookups below it needs, and its clicks' times.
    kinds = events.groupBy("event_date").agg(
        F.max(F.col("kind") == f"{_PINNED}impressions").alias("pinned"),
        F.max(is_click).alias("clicks"),
        F.unix_micros(F.min(F.when(is_click, F.col("event_time")))).alias("first_click"),
        F.unix_micros(F.max(F.when(is_click, F.col("event_time")))).alias("last_click"),
    ).collect()
    dates = affected_dates(sorted(r["event_date"] for r in kinds))
    if not dates:
        return {}
    has_pinned, has_clicks = any(r["pinned"] for r in kinds), any(r["clicks"] for r in kinds)
    first, last = dates[0], dates[-1]
    in_dates = F.col("event_date").isin(*[F.lit(d) for d in dates])
    times = events.select("event_time")
    changed_ids = events.filter(F.col("kind").isin(*_CLICK_KINDS)).select(F.col("event_id").alias("changed_id"))
    viewers = None  # conversions with a view-through candidate on a pinned-out impression
    pinned = events.filter(F.col("kind") == f"{_PINNED}impressions").select(F.col("event_id").alias("pinned_id"))
    # Loading the table reads its Delta log: once at most, and only for a batch that needs it.
    candidates = functools.cache(lambda: read_candidates(spark, settings, first, last))
    if has_pinned:
        referrers = (
            candidates()
            .filter(in_dates & F.col("kind").isin(attribution.CLICK_BY_ID, attribution.CLICK_BY_WINDOW,
                                                  attribution.CONVERSION_VIEW))
            .join(F.broadcast(pinned), on=F.col("match_id") == F.col("pinned_id"), how="left_semi")
            .select("kind", "event_id")
            .localCheckpoint()
        )
        changed_ids = changed_ids.unionByName(referrers.filter(F.col("kind") != attribution.CONVERSION_VIEW)
                                              .select(F.col("event_id").alias("changed_id")))
        viewers = referrers.filter(F.col("kind") == attribution.CONVERSION_VIEW).select(F.col("event_id").alias("dependent_id"))
    changed_ids = changed_ids.distinct()
    if has_clicks or has_pinned:  # a left-out impression's referrers may be clicks
        silver = {name: df.filter(in_dates)
                  for name, df in backfill.read_silver(spark, settings, first, last, versions, loaded).items()}
        clicks, conversions = silver["clicks"], silver["conversions"]
        pairs = candidates().filter(in_dates & (F.col("kind") == attribution.CONVERSION_CLICK))
        repeat = Windows.from_conf(settings.conf).repeat_click
        if not has_pinned:
            low = F.timestamp_micros(F.lit(min(r["first_click"] for r in kinds if r["first_click"] is not None)))
            high = F.timestamp_micros(F.lit(max(r["last_click"] for r in kinds if r["last_click"] is not None)
                                            + int(parse_interval(repeat) / dt.timedelta(microseconds=1))))
            clicks = clicks.filter(F.col("event_time").between(low, high))
            pairs = pairs.filter(F.col("match_time").between(low, high))  # a conversion_click's match: its click
            conversions = conversions.filter(F.col("event_time") >= low)
        clicks = clicks.select("event_id", "user_key", "event_time")
        changed = (
            clicks.join(F.broadcast(changed_ids), on=F.col("event_id") == F.col("changed_id"), how="left_semi")
            .select(F.col("user_key").alias("c_user"), F.col("event_time").alias("c_time"))
        )
        window = attribution.interval(repeat)
        followers = clicks.join(
            F.broadcast(changed),
            on=(F.col("user_key") == F.col("c_user")) & (F.col("event_time") > F.col("c_time"))
            & (F.col("event_time") <= F.col("c_time") + window),
            how="left_semi",
        )
        touched_clicks = changed_ids.unionByName(followers.select(F.col("event_id").alias("changed_id")))
        dependents = (
            pairs.join(F.broadcast(touched_clicks), on=F.col("match_id") == F.col("changed_id"), how="left_semi")
            .select(F.col("event_id").alias("dependent_id"))
        )
        if viewers is not None:
            dependents = dependents.unionByName(viewers)
        conversions = conversions.join(
            F.broadcast(dependents), on=F.col("event_id") == F.col("dependent_id"), how="left_semi")
        times = (
            times.unionByName(changed.select(F.col("c_time").alias("event_time")))  # clicks referring to pinned-out impressions
            .unionByName(followers.select("event_time"))
            .unionByName(conversions.select("event_time"))
        )
    return gold.hours_of(times.filter(F.to_date("event_time").isin(*[F.lit(d) for d in dates])), "event_time")


_DAY_FIGURES = ("impressions", "clicks", "attributed_clicks", "conversions")


def day_figures(spark: SparkSession, settings: Settings, dates: list[dt.date], silver: dict[str, DataFrame],
                auctions: SettledAuctions | None = None, changed_hours: list[int] | None = None
                ) -> dict[str, dict[str, int]]:
    """The cross-feed checks' input after a gold batch that rebuilt ``dates``, as {"gold:<measure>":
    {campaign: n}}: each campaign's counts on the newest of them from campaign_performance_daily
    (a row per campaign), and that day's settled auctions in ``silver`` (the frames
    ``backfill.load_silver`` gives; ``SettledAuctions``; ``changed_hours``:
    the hours of that day whose silver rows may have changed since the last call). Clicks and
    attributed clicks also per rebuilt date, as {"gold:<measure>_by_date": {date: n}}: clicks that
    match nothing are judged on the day they fall on, which need not be the newest (a batch also
    rebuilds the day after the one its events touch, and a few events may be a day ahead)."""
    day = dates[-1]
    rows = (
        spark.read.format("delta").load(settings.table("gold/campaign_performance_daily"))
        .filter(F.col("event_date").isin(*dates))
        .select("event_date", "campaign_id", *_DAY_FIGURES)
        .collect()
    )
    figures = {f"gold:{name}": {r["campaign_id"]: int(r[name] or 0) for r in rows if r["event_date"] == day}
               for name in _DAY_FIGURES}
    for name in ("clicks", "attributed_clicks"):
        figures[f"gold:{name}_by_date"] = {d.isoformat(): sum(int(r[name] or 0) for r in rows if r["event_date"] == d)
                                           for d in dates}
    auctions = auctions or SettledAuctions()
    figures.update(auctions.figures(spark, settings, day, silver, changed_hours))
    return figures


class SettledAuctions:
    """Impressions won in an auction, and bid requests won, over a day's settled hours: the hours
    that end a bid-request window before the newest bid request in silver. Later impressions may
    still be waiting for their bid request from the other feed; judging them would raise "wins
    without a bid request" for every batch in which the impressions' query commits before the bid
    requests' one. Non-IVT on both sides, as the bid funnel counts.

    Kept from one gold batch to the next, so that a batch reads silver only where it changed:
    the bid requests newer than the newest one seen, and the impressions of the hours the batch
    rebuilt. Silver only gains rows, so what was counted stays counted; a new instance (a
    restart) counts the day once in full. Without that, every batch scanned the whole day's
    impressions and bid requests, which grows all day long (about 430M rows at 5,000 events/s).
    """

    DAYS_KEPT = 3

    def __init__(self):
        self._newest: dict[dt.date, int] = {}  # day -> newest non-IVT bid request seen, in UTC microseconds
        self._won: dict[dt.date, dict[int, int]] = {}  # day -> {hour: won impressions counted}

    def figures(self, spark: SparkSession, settings: Settings, day: dt.date, silver: dict[str, DataFrame],
                changed_hours: list[int] | None = None) -> dict[str, dict[str, int]]:
        """``silver``: the frames ``backfill.load_silver`` gives; ``changed_hours``: the hours of
        ``day`` whose silver impressions may have changed since the last call (None: any)."""
        def counted(name):
            return silver[name].filter((F.col("event_date") == F.lit(day)) & ~F.col("is_ivt"))

        bids = counted("bid_requests")
        if day in self._newest:
            bids = bids.filter(F.col("event_time") > F.timestamp_micros(F.lit(self._newest[day])))
        newest = bids.agg(F.unix_micros(F.max("event_time"))).first()[0]
        if newest is not None:
            self._newest[day] = max(newest, self._newest.get(day, newest))
        self._forget_old_days()
        if day not in self._newest:
            return {}  # no bid request yet
        window = parse_interval(Windows.from_conf(settings.conf).bid_request)
        until = dt.datetime.fromtimestamp(0, dt.timezone.utc) + dt.timedelta(microseconds=self._newest[day]) - window
        if until.date() != day:
            return {}  # none settled on this day
        won = self._won.setdefault(day, {})
        stale = [h for h in range(until.hour) if h not in won or changed_hours is None or h in changed_hours]
        if stale:
            counts = (
                counted("impressions")
                .filter(F.col("event_hour").isin(*stale) & F.col("auction_id").isNotNull())
                .groupBy("event_hour").count().collect()
            )
            won.update({h: 0 for h in stale})
            won.update({r["event_hour"]: int(r["count"]) for r in counts})
        wins = (
            spark.read.format("delta").load(settings.table("gold/bid_funnel_hourly"))
            .filter((F.col("event_date") == F.lit(day)) & (F.col("event_hour") < F.lit(until.hour)))
            .agg(F.sum("wins")).first()[0]
        )
        return {"gold:won_impressions": {"*": sum(won[h] for h in range(until.hour))},
                "gold:wins": {"*": int(wins or 0)}}

    def _forget_old_days(self) -> None:
        for day in sorted(self._newest)[:-self.DAYS_KEPT]:
            self._newest.pop(day, None)
            self._won.pop(day, None)


def affected_dates(touched: list[dt.date]) -> list[dt.date]:
    """The touched dates and the day after each: a click or an impression can change the touch of a
    conversion up to 24 h later, and a click the repeat verdict of one just after midnight. Only
    the hours that do depend on the batch are rebuilt there (``affected_hours``)."""
    return sorted(set(touched) | {d + dt.timedelta(days=1) for d in touched})


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
        .foreachBatch(quiet_when_stopped(GoldBatchWriter(spark, settings, checkpoint, monitor)))
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
