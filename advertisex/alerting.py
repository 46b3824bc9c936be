"""The alerting loop of a running pipeline: metric history in, alerts out.

The micro-batch handlers and the progress listener hand the ``Monitor`` what they measured (one
``ops/metrics`` row per batch, one progress summary per query progress); a worker thread keeps a
bounded history per feed, runs every detector of ``advertisex.detectors`` over it after each
input and every ``check_interval_seconds`` (a stopped feed sends nothing to wake it), and tracks
open alerts in an ``AlertBook``. Each change of an alert, firing or resolved, goes three ways:

- a row in ``ops/alerts`` (Delta, append-only: one row when an alert opens, one when it resolves);
- a POST to every webhook in conf, as a Slack message or an Alertmanager alert list;
- the ``advx_alert_active`` gauge, 1 while the alert is open.

Nothing here runs on a streaming callback: handlers and listeners only enqueue, so a slow Delta
write or an unreachable webhook delays alerts, never a micro-batch.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import logging
import queue
import statistics
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

from delta.tables import DeltaTable
from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F

from advertisex import detectors, lake
from advertisex.config import Settings, resolve_secrets
from advertisex.detectors import Alert, AlertBook
from advertisex.monitoring import BatchAccount, PipelineMetrics

log = logging.getLogger("advertisex")

ALERTS_TABLE = "ops/alerts"
ALERTS_SCHEMA = (
    "alert_id STRING, status STRING, rule STRING, severity STRING, feed STRING, campaign_id STRING, "
    "observed DOUBLE, baseline DOUBLE, message STRING, started_at TIMESTAMP, changed_at TIMESTAMP"
)
HISTORY = 50  # batches kept per feed: the detectors look back min_history..~20 batches
FEED_TABLES = {"impressions": ["impressions"], "clicks_conversions": ["clicks", "conversions"],
               "bid_requests": ["bid_requests"]}


@dataclass
class FeedBatch:
    """What the detectors need of one feed micro-batch (an ``ops/metrics`` row)."""

    feed: str
    started_at: float  # Unix seconds
    rows_in: int
    quarantine_by_rule: dict[str, int]
    max_event_time: float | None
    unknown_fields: dict[str, int]
    by_campaign: dict[str, dict[str, int]]
    interval: float | None = None  # seconds since the feed's previous batch started

    @classmethod
    def _of(cls, feed: str, started_at: dt.datetime, rows_in: int | None, quarantine_by_rule: dict | None,
            max_event_time: dt.datetime | None, unknown_fields: dict | None, by_campaign: dict | None) -> FeedBatch:
        return cls(feed, started_at.timestamp(), int(rows_in or 0), dict(quarantine_by_rule or {}),
                   max_event_time.timestamp() if max_event_time is not None else None, dict(unknown_fields or {}),
                   {k: dict(v) for k, v in (by_campaign or {}).items()})

    @classmethod
    def of(cls, account: BatchAccount, started_at: dt.datetime) -> FeedBatch:
        """A feed batch as the pipeline just accounted it."""
        return cls._of(account.feed, started_at, account.rows_in, account.quarantine_by_rule,
                       account.max_event_time, account.unknown_fields, account.by_campaign)

    @classmethod
    def of_metrics_row(cls, row) -> FeedBatch:
        """A feed batch as ``ops/metrics`` keeps it."""
        return cls._of(row["feed"], row["batch_started_at"], row["rows_in"], row["quarantine_by_rule"],
                       row["max_event_time"], row["unknown_fields"], row["by_campaign"])

    def rate(self, rows: int) -> float | None:
        """Rows per second since the previous batch: batch sizes depend on trigger timing, rates do not."""
        return rows / self.interval if self.interval else None


@dataclass
class QueryProgress:
    """The part of a StreamingQueryProgress the detectors use."""

    query: str
    input_rate: float
    processed_rate: float
    rows_in: int
    dropped_by_watermark: int
    kafka_offsets_lost: int


@dataclass
class History:
    feeds: dict[str, collections.deque] = field(default_factory=dict)
    last_data: dict[str, float] = field(default_factory=dict)
    progress: dict[str, collections.deque] = field(default_factory=dict)
    gold: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    dropped: int = 0
    gold_rows_in: int = 0
    lost: dict[str, int] = field(default_factory=dict)

    def add_feed_batch(self, batch: FeedBatch) -> None:
        batches = self.feeds.setdefault(batch.feed, collections.deque(maxlen=HISTORY))
        if batches:  # the caller's batch stays as it was given
            batch = dataclasses.replace(batch, interval=max(batch.started_at - batches[-1].started_at, 1e-3))
        batches.append(batch)
        if batch.rows_in:
            self.data_arrived(batch.feed, batch.started_at)

    def data_arrived(self, feed: str, at: float) -> None:
        """A micro-batch of ``feed`` began at ``at`` with new input (file and Kafka sources start
        one only then): its data had arrived by then. Told when the batch begins, so that a feed
        whose batches each take a minute still counts as delivering while they run, and a feed that
        stopped is silent from its last batch's start rather than from that batch's commit."""
        self.last_data[feed] = max(self.last_data.get(feed, at), at)

    def add_progress(self, p: QueryProgress) -> None:
        self.progress.setdefault(p.query, collections.deque(maxlen=HISTORY)).append(p)
        if p.query == "advx_gold":
            self.dropped += p.dropped_by_watermark
            self.gold_rows_in += p.rows_in
        if p.kafka_offsets_lost:
            self.lost[p.query] = self.lost.get(p.query, 0) + p.kafka_offsets_lost


def recent_batches(spark: SparkSession, path: str, limit: int = HISTORY) -> tuple[list[FeedBatch], list[dict]]:
    """The newest ``limit`` feed batches of each feed and gold batches in ``ops/metrics``, oldest
    first: the baselines a pipeline had before it was restarted."""
    if not DeltaTable.isDeltaTable(spark, path):
        return [], []
    newest_first = Window.partitionBy("feed").orderBy(F.col("batch_started_at").desc())
    rows = (
        spark.read.format("delta").load(path)
        .filter(F.col("feed").isin(*FEED_TABLES, "gold"))
        .withColumn("_newest", F.row_number().over(newest_first))
        .filter(F.col("_newest") <= limit)
        .orderBy("batch_started_at")
        .collect()
    )
    feeds = [FeedBatch.of_metrics_row(row) for row in rows if row["feed"] != "gold"]
    gold = [{k: dict(v) for k, v in (row["by_campaign"] or {}).items()} for row in rows if row["feed"] == "gold"]
    return feeds, gold


def evaluate(history: History, conf: dict, now: float, continuous: bool) -> list[Alert]:
    """Every detector over the history as it is now: the alerts whose condition holds."""
    found: list[Alert | None] = []
    for feed, batches in history.feeds.items():
        found += _feed_alerts(feed, list(batches), conf)
    if continuous:  # a finite run ends when its input does; silence is not news there
        for feed, last in history.last_data.items():
            found.append(detectors.stale_feed(now - last, conf, feed))
    for query, progress in history.progress.items():
        feed = query.removeprefix("advx_")
        found.append(detectors.falling_behind([p.input_rate for p in progress], [p.processed_rate for p in progress],
                                              conf, feed))
    for query, lost in history.lost.items():
        found.append(detectors.kafka_data_loss(lost, query.removeprefix("advx_")))
    found.append(detectors.watermark_drops(history.dropped, history.gold_rows_in, conf))
    found += _gold_alerts(list(history.gold), conf)
    return [alert for alert in found if alert is not None]


def _feed_alerts(feed: str, batches: list[FeedBatch], conf: dict) -> list[Alert | None]:
    latest, before = batches[-1], batches[:-1]
    found: list[Alert | None] = []
    rated = [b for b in batches if b.interval]
    feed_alert = None
    if rated and _enough(rated, lambda b: b.rows_in, conf):
        feed_alert = detectors.volume([b.rate(b.rows_in) for b in rated], conf, feed)
        found.append(feed_alert)
    for table in FEED_TABLES[feed]:
        measure = f"silver:{table}"
        campaigns = {c for b in rated for c in b.by_campaign.get(measure, {})}
        for campaign in sorted(campaigns):
            def rows(b, measure=measure, campaign=campaign):
                return b.by_campaign.get(measure, {}).get(campaign, 0)
            if not _enough(rated, rows, conf):
                continue
            alert = detectors.volume([b.rate(rows(b)) for b in rated], conf, feed, campaign)
            if alert is not None and feed_alert is not None and alert.rule == feed_alert.rule \
                    and not _share_moved(rated, rows, conf):
                continue  # the whole feed moved and this campaign with it: the feed's alert says it all
            found.append(alert)
    if latest.max_event_time is not None:
        found.append(detectors.event_time_lag(latest.started_at - latest.max_event_time, conf, feed))
    checked_by_own_detector = {"unknown_creative"}
    found += detectors.quarantine_ratio(
        latest.rows_in, {r: n for r, n in latest.quarantine_by_rule.items() if r not in checked_by_own_detector},
        conf, feed)
    found += detectors.new_rule_firing([b.quarantine_by_rule for b in before], latest.quarantine_by_rule, conf, feed)
    found.append(detectors.schema_drift(latest.unknown_fields, conf, feed))
    if feed == "impressions":
        found.append(detectors.unknown_creatives(latest.quarantine_by_rule.get("unknown_creative", 0),
                                                 latest.rows_in, conf))
    return found


def _share_moved(batches: list[FeedBatch], rows, conf: dict) -> bool:
    """Whether a campaign's share of its feed in the newest batch left its usual share by more than
    ``min_relative`` of it (a flood on one campaign does; a feed-wide drop does not)."""
    shares = [rows(b) / b.rows_in for b in batches if b.rows_in]
    if len(shares) < 2:
        return True
    usual = statistics.median(shares[:-1])
    return abs(shares[-1] - usual) > conf["min_relative"] * usual


def _enough(batches: list[FeedBatch], rows, conf: dict) -> bool:
    """Volume is judged only where the newest batch or the typical one has min_rows_for_ratio
    rows: a campaign's 2 clicks becoming 6 is noise, not a spike."""
    counts = [rows(b) for b in batches]
    return max(counts[-1], sorted(counts)[len(counts) // 2]) >= conf["min_rows_for_ratio"]


def _gold_alerts(days: list[dict[str, dict[str, int]]], conf: dict) -> list[Alert | None]:
    """Cross-feed checks over gold: each entry is one gold batch's campaign figures of its latest day."""
    if not days:
        return []
    latest = days[-1]
    found: list[Alert | None] = [_unmatched_clicks(latest, conf)]
    # Wins must lack their bid request after two gold batches in a row: in one batch the feeds'
    # queries can be far enough apart (seen at 60 % on 2 cores) to fake it for a moment. And not
    # before min_history gold batches: a new pipeline's first gold batches see the feeds' queries
    # furthest apart (an end-to-end run's second counted 1,999 won impressions against 690 wins).
    # A restart reloads gold's history from ops/metrics, so this wait does not cover one.
    orphans = [detectors.wins_without_bid_request(
        max(0, sum(d["gold:won_impressions"].values()) - sum(d["gold:wins"].values())),
        sum(d["gold:won_impressions"].values()), conf) for d in days[-2:] if "gold:wins" in d]
    if len(days) > conf["min_history"] and len(orphans) == 2 and all(orphans):
        found.append(orphans[-1])
    clicks, impressions = latest.get("gold:clicks", {}), latest.get("gold:impressions", {})
    conversions = latest.get("gold:conversions", {})
    for campaign in sorted(set(clicks) | set(conversions)):
        found.append(detectors.conversions_exceed_clicks(conversions.get(campaign, 0), clicks.get(campaign, 0),
                                                         conf, campaign))
        n_clicks, n_imps = clicks.get(campaign, 0), impressions.get(campaign, 0)
        if n_clicks < conf["min_clicks_for_ctr"] or not n_imps:
            continue
        # Only days measured on enough clicks make the baseline: early in a day the few clicks in
        # gold (clicks trail their impressions) would set a baseline far below the real CTR.
        ctr_history = [d["gold:clicks"][campaign] / d["gold:impressions"][campaign] for d in days[:-1]
                       if d.get("gold:impressions", {}).get(campaign)
                       and d.get("gold:clicks", {}).get(campaign, 0) >= conf["min_clicks_for_ctr"]]
        found.append(detectors.ctr_jump(ctr_history, n_clicks, n_imps, conf, campaign))
    return found


def _unmatched_clicks(latest: dict[str, dict[str, int]], conf: dict) -> Alert | None:
    """Clicks that match no impression, judged on each date the gold batch rebuilt: the alert of
    the date with the highest share, if any breaks the limit. (A batch written before gold kept
    the figures per date has the newest day's alone.)"""
    by_date = latest.get("gold:clicks_by_date")
    if by_date is None:
        clicks, attributed = latest.get("gold:clicks", {}), latest.get("gold:attributed_clicks", {})
        return detectors.unmatched_clicks(sum(clicks.values()) - sum(attributed.values()), sum(clicks.values()), conf)
    attributed = latest.get("gold:attributed_clicks_by_date", {})
    alerts = [detectors.unmatched_clicks(clicks - attributed.get(day, 0), clicks, conf, day=day)
              for day, clicks in sorted(by_date.items())]
    return max((a for a in alerts if a is not None), key=lambda a: a.observed, default=None)


class Sinks:
    """Where alert changes go: ops/alerts, the webhooks, the Prometheus gauge."""

    def __init__(self, spark: SparkSession, settings: Settings, metrics: PipelineMetrics):
        self.spark = spark
        self.path = settings.table(ALERTS_TABLE)
        self.metrics = metrics
        self.webhooks = [
            {**hook, "url": resolve_secrets({"url": hook["url"]}, "monitoring.alerting.webhooks")["url"]}
            for hook in settings.conf["monitoring"]["alerting"]["webhooks"] or []
        ]
        self.timeout = settings.conf["monitoring"]["alerting"]["webhook_timeout_seconds"]

    def emit(self, changes: list[tuple[Alert, str, str, str]], now: dt.datetime) -> None:
        """``changes``: (alert, status, alert id, started_at ISO) for each alert that fired or resolved."""
        if not changes:
            return
        for alert, status, _, _ in changes:
            labels = (alert.rule, alert.severity, alert.feed or "", alert.campaign or "")
            if status == "firing":
                self.metrics.alert.labels(*labels).set(1)
            else:
                self.metrics.alert.remove(*labels)
            log.log(logging.ERROR if status == "firing" else logging.INFO, "ALERT %s %s (%s): %s",
                    status.upper(), alert.rule, alert.severity, alert.message)
        self._append(changes, now)
        for hook in self.webhooks:
            for alert, status, _, started_at in changes:
                self._post(hook, alert, status, started_at, now)

    def _append(self, changes, now: dt.datetime) -> None:
        rows = [(alert_id, status, a.rule, a.severity, a.feed, a.campaign, float(a.observed),
                 None if a.baseline is None else float(a.baseline), a.message,
                 dt.datetime.fromisoformat(started_at), now)
                for a, status, alert_id, started_at in changes]
        frame = self.spark.createDataFrame(rows, ALERTS_SCHEMA)
        try:
            lake.with_conflict_retries(lambda: frame.write.format("delta").mode("append").save(self.path))
        except Exception:  # noqa: BLE001 - an alert that cannot be stored is still sent and logged
            log.exception("ops/alerts: could not store %d alert changes", len(rows))

    def _post(self, hook: dict, alert: Alert, status: str, started_at: str, now: dt.datetime) -> None:
        if hook["format"] == "alertmanager":
            body = detectors.alertmanager_payload(alert, status, started_at, now.isoformat())
        else:
            body = detectors.slack_payload(alert, status)
        request = urllib.request.Request(hook["url"], data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except Exception as exc:  # noqa: BLE001 - a receiver being down must not stop the others
            # The URL may hold a token (Slack's does): name the hook by its format only.
            log.warning("alert webhook (%s) failed for %s: %s", hook["format"], alert.rule, type(exc).__name__)


class Monitor:
    """Runs the detectors on a worker thread; handlers and listeners feed it without waiting."""

    def __init__(self, spark: SparkSession, settings: Settings, metrics: PipelineMetrics, continuous: bool,
                 clock=time.time):
        monitoring_conf = settings.conf["monitoring"]
        self.conf = monitoring_conf["detectors"]
        self.interval = monitoring_conf["alerting"]["check_interval_seconds"]
        self.continuous = continuous
        self.clock = clock
        self.metrics = metrics
        self.sinks = Sinks(spark, settings, metrics)
        self.history = History()
        self.book = AlertBook()
        self.ids: dict[tuple, str] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="advx-monitor", daemon=True)
        self.started_at = clock()
        metrics.set_thresholds(self.conf)
        lake.ensure_table(spark, spark.createDataFrame([], ALERTS_SCHEMA), self.sinks.path)
        self._restore(spark, settings)

    def _restore(self, spark: SparkSession, settings: Settings) -> None:
        """Start from the history in ``ops/metrics``, so that a restarted pipeline judges its first
        batches against the baselines it had, not against nothing. Silence is still counted from
        this start: the time the pipeline was down is not the feeds' fault."""
        feeds, gold = recent_batches(spark, settings.table("ops/metrics"))
        for batch in feeds:
            self.history.add_feed_batch(batch)
        self.history.gold.extend(gold)
        self.history.last_data.clear()
        if feeds or gold:
            log.info("monitor: baselines restored from ops/metrics (%d feed batches, %d gold batches)",
                     len(feeds), len(gold))

    # -- inputs (any thread; never blocks) --------------------------------------------------------
    def feed_batch(self, account: BatchAccount, started_at: dt.datetime, seconds: float) -> None:
        self.metrics.record_feed(account, started_at + dt.timedelta(seconds=seconds))
        self.inbox.put(FeedBatch.of(account, started_at))

    def feed_batch_started(self, feed: str, started_at: dt.datetime) -> None:
        self.metrics.last_data.labels(feed).set(started_at.timestamp())
        self.inbox.put(("started", feed, started_at.timestamp()))

    def gold_batch(self, by_campaign: dict[str, dict[str, int]]) -> None:
        self.metrics.record_gold(by_campaign)
        self.inbox.put(("gold", by_campaign))

    def progress(self, progress: QueryProgress) -> None:
        self.inbox.put(progress)

    def expect_feeds(self, feeds) -> None:
        """Feeds that must deliver: silence counts from the start even if one never sends a record."""
        self.inbox.put(("expect", list(feeds)))

    # -- the worker ---------------------------------------------------------------------------------
    def start(self) -> Monitor:
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Process what is queued, evaluate once more, then end the thread."""
        self.stopping.set()
        self.inbox.put(None)  # wakes the worker now rather than at its next check interval
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                items = [self.inbox.get(timeout=self.interval)]
            except queue.Empty:
                items = []
            while True:  # drain what queued meanwhile: one evaluation for a burst of inputs
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                for item in items:
                    self._take(item)
                self.check()
            except Exception:  # noqa: BLE001 - a bug in one check must not end monitoring
                log.exception("monitor: evaluating the detectors failed")
            if self.stopping.is_set() and self.inbox.empty():
                return

    def _take(self, item) -> None:
        if isinstance(item, FeedBatch):
            self.history.add_feed_batch(item)
        elif isinstance(item, QueryProgress):
            self.history.add_progress(item)
        elif isinstance(item, tuple) and item[0] == "gold":
            self.history.gold.append(item[1])
        elif isinstance(item, tuple) and item[0] == "started":
            self.history.data_arrived(item[1], item[2])
        elif isinstance(item, tuple) and item[0] == "expect":
            for feed in item[1]:
                self.history.last_data.setdefault(feed, self.started_at)

    def check(self) -> list[Alert]:
        """Evaluate now; store, send and expose what changed. Returns the alerts that fired."""
        now = self.clock()
        at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        firing = evaluate(self.history, self.conf, now, self.continuous)
        new, resolved = self.book.update(firing, at.isoformat())
        changes = []
        for alert in new:
            self.ids[alert.key] = str(uuid.uuid4())
            changes.append((alert, "firing", self.ids[alert.key], at.isoformat()))
        for alert, since in resolved:
            changes.append((alert, "resolved", self.ids.pop(alert.key), since))
        self.sinks.emit(changes, at)
        return new
