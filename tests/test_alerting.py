"""The alerting loop on hand-made histories: which detector fires on which history, and what one
alert's life looks like on each channel (ops/alerts, the webhook bodies, the Prometheus gauge)."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import http.server
import json
import threading

from chispa import assert_df_equality
from prometheus_client import CollectorRegistry

from advertisex import alerting, monitoring
from advertisex.alerting import FeedBatch, History, QueryProgress, evaluate
from advertisex.config import load_conf
from conftest import read_table, settings_for

CONF = load_conf(None).conf["monitoring"]["detectors"]


def feed_history(feed: str, rows: list[int], by_rule: list[dict] | None = None, campaigns: list[dict] | None = None,
                 every: float = 10.0, lag: float = 60.0) -> History:
    history = History()
    for n, count in enumerate(rows):
        started = 1_000_000 + n * every
        history.add_feed_batch(FeedBatch(
            feed, started, count, (by_rule or [{}] * len(rows))[n], started - lag, {},
            {f"silver:{alerting.FEED_TABLES[feed][0]}": (campaigns or [{}] * len(rows))[n]}))
    return history


def rules_of(alerts) -> list[tuple]:
    return sorted(((a.rule, a.feed, a.campaign) for a in alerts), key=lambda k: tuple(v or "" for v in k))


def test_a_steady_feed_raises_nothing():
    history = feed_history("impressions", [1000, 1040, 980, 1010, 995, 1020, 1005],
                           by_rule=[{"malformed_record": 3}] * 7,
                           campaigns=[{"cmp-0001": 500, "cmp-0002": 500}] * 7)
    assert evaluate(history, CONF, now=1_000_070, continuous=True) == []


def test_rates_not_batch_sizes_make_the_volume():
    """A batch that waited twice as long holds twice the rows: not a spike."""
    history = History()
    for started, rows in [(0, 1000), (10, 1000), (20, 1000), (30, 1000), (40, 1000), (50, 1000), (70, 2000)]:
        history.add_feed_batch(FeedBatch("impressions", 1_000_000 + started, rows, {}, None, {}, {}))
    assert evaluate(history, CONF, now=1_000_070, continuous=False) == []


def test_a_click_flood_on_one_campaign_is_a_volume_spike_there():
    normal = {"cmp-0001": 150, "cmp-0002": 150}
    history = feed_history("clicks_conversions", [300] * 6 + [1100], campaigns=[normal] * 6 + [
        {"cmp-0001": 950, "cmp-0002": 150}])
    assert rules_of(evaluate(history, CONF, now=1_000_060, continuous=True)) == [
        ("volume_spike", "clicks_conversions", None), ("volume_spike", "clicks_conversions", "cmp-0001")]


def test_a_feed_wide_drop_is_one_alert_not_one_per_campaign():
    history = feed_history("bid_requests", [600] * 6 + [150], campaigns=[{"cmp-0001": 300, "cmp-0002": 300}] * 6 + [
        {"cmp-0001": 75, "cmp-0002": 75}])
    assert rules_of(evaluate(history, CONF, now=1_000_060, continuous=True)) == [("volume_drop", "bid_requests", None)]


def test_a_few_clicks_more_on_a_small_campaign_is_noise():
    history = feed_history("clicks_conversions", [300] * 7, campaigns=[{"cmp-0001": 2}] * 6 + [{"cmp-0001": 9}])
    assert evaluate(history, CONF, now=1_000_060, continuous=True) == []


def test_a_malformed_burst_and_a_new_rule():
    history = feed_history("impressions", [1000] * 6 + [1000],
                           by_rule=[{}] * 6 + [{"malformed_record": 400, "negative_amount": 12}])
    assert rules_of(evaluate(history, CONF, now=1_000_060, continuous=True)) == [
        ("new_rule:malformed_record", "impressions", None), ("new_rule:negative_amount", "impressions", None),
        ("quarantine_ratio:malformed_record", "impressions", None)]


def test_a_silent_feed_is_stale_only_in_a_continuous_run():
    history = feed_history("bid_requests", [500] * 3)
    now = 1_000_020 + CONF["max_silence_seconds"] + 1
    assert rules_of(evaluate(history, CONF, now=now, continuous=True)) == [("feed_stale", "bid_requests", None)]
    assert evaluate(history, CONF, now=now, continuous=False) == []


def test_a_feed_is_silent_from_the_start_of_its_last_batch():
    """A batch reports when it begins: while it runs the feed is delivering, and once the feed stops,
    silence counts from the start of the batch that carried its last data, not from its commit."""
    history = feed_history("bid_requests", [500] * 3, every=10.0)  # batches began at +0, +10, +20
    history.data_arrived("bid_requests", 1_000_050)  # a batch began at +50 and is still running
    limit = CONF["max_silence_seconds"]
    assert evaluate(history, CONF, now=1_000_050 + limit - 1, continuous=True) == []
    history.add_feed_batch(FeedBatch("bid_requests", 1_000_050, 500, {}, None, {}, {}))
    history.data_arrived("bid_requests", 1_000_030)  # a late message of an older batch never moves it back
    assert rules_of(evaluate(history, CONF, now=1_000_050 + limit + 1, continuous=True)) == [
        ("feed_stale", "bid_requests", None)]


def test_old_events_are_an_event_time_lag():
    history = feed_history("impressions", [1000] * 3, lag=CONF["max_event_lag_seconds"] + 60)
    assert rules_of(evaluate(history, CONF, now=1_000_020, continuous=False)) == [("event_time_lag", "impressions", None)]


def test_progress_behind_input_lost_offsets_and_watermark_drops():
    history = History()
    for _ in range(3):
        history.add_progress(QueryProgress("advx_impressions", 5000.0, 3000.0, 5000, 0, 0))
        history.add_progress(QueryProgress("advx_gold", 100.0, 900.0, 1000, 80, 0))
    history.add_progress(QueryProgress("advx_bid_requests", 10.0, 900.0, 10, 0, 42))
    assert rules_of(evaluate(history, CONF, now=0, continuous=False)) == [
        ("dropped_by_watermark", "gold", None), ("falling_behind", "impressions", None),
        ("kafka_data_loss", "bid_requests", None)]


def day(clicks: dict, attributed: dict, impressions: dict, conversions: dict | None = None) -> dict:
    return {"gold:clicks": clicks, "gold:attributed_clicks": attributed, "gold:impressions": impressions,
            "gold:conversions": conversions or {}}


def test_wins_without_a_bid_request_over_the_settled_hours():
    history = History()
    skewed = {**day({}, {}, {}), "gold:won_impressions": {"*": 1000}, "gold:wins": {"*": 300}}
    for _ in range(CONF["min_history"]):  # just after a start: the feeds' queries far apart, not judged
        history.gold.append(skewed)
        assert evaluate(history, CONF, now=0, continuous=False) == []
    history.gold.append({**day({}, {}, {}), "gold:won_impressions": {"*": 1000}, "gold:wins": {"*": 990}})
    assert evaluate(history, CONF, now=0, continuous=False) == []
    history.gold.append({**day({}, {}, {}), "gold:won_impressions": {"*": 1000}, "gold:wins": {"*": 700}})
    assert evaluate(history, CONF, now=0, continuous=False) == []  # one batch: maybe the feeds' skew
    history.gold.append({**day({}, {}, {}), "gold:won_impressions": {"*": 1100}, "gold:wins": {"*": 720}})
    assert rules_of(evaluate(history, CONF, now=0, continuous=False)) == [
        ("wins_without_bid_request", "bid_requests", None)]


def test_cross_feed_checks_on_gold():
    history = History()
    for _ in range(6):
        history.gold.append(day({"cmp-0001": 100, "cmp-0002": 100}, {"cmp-0001": 95, "cmp-0002": 95},
                                {"cmp-0001": 5000, "cmp-0002": 5000}, {"cmp-0001": 10, "cmp-0002": 10}))
    assert evaluate(history, CONF, now=0, continuous=False) == []
    # cmp-0001's clicks jump and half of all clicks match nothing; cmp-0002 converts more than it clicks
    history.gold.append(day({"cmp-0001": 700, "cmp-0002": 100}, {"cmp-0001": 200, "cmp-0002": 95},
                            {"cmp-0001": 5100, "cmp-0002": 5100}, {"cmp-0001": 10, "cmp-0002": 300}))
    assert rules_of(evaluate(history, CONF, now=0, continuous=False)) == [
        ("clicks_without_impression", "clicks_conversions", None),
        ("conversions_exceed_clicks", "clicks_conversions", "cmp-0002"),
        ("ctr_jump", "clicks_conversions", "cmp-0001")]


def test_clicks_without_impression_are_judged_on_the_date_they_fall_on():
    """A gold batch rebuilds the day after the one its events touch: 610 of 1,400 clicks matching
    nothing on the 26th must alert although the batch's newest day, the 27th, is clean."""
    history = History()
    newest = day({"cmp-0001": 600}, {"cmp-0001": 590}, {"cmp-0001": 30000})
    history.gold.append({**newest, "gold:clicks_by_date": {"2026-11-26": 1400, "2026-11-27": 600},
                         "gold:attributed_clicks_by_date": {"2026-11-26": 790, "2026-11-27": 590}})
    alerts = evaluate(history, CONF, now=0, continuous=False)
    assert [(a.rule, a.observed, a.message) for a in alerts] == [
        ("clicks_without_impression", 610 / 1400,
         "clicks with no impression on 2026-11-26: 43.6% (610 of 1,400; limit 20.0%)")]
    # the same date with too few clicks to judge, and both dates clean: nothing
    history.gold.append({**newest, "gold:clicks_by_date": {"2026-11-26": 40, "2026-11-27": 600},
                         "gold:attributed_clicks_by_date": {"2026-11-26": 0, "2026-11-27": 590}})
    assert evaluate(history, CONF, now=0, continuous=False) == []


def test_the_gold_gauges_keep_the_dates_of_the_last_gold_batch_only():
    from prometheus_client import CollectorRegistry

    from advertisex.monitoring import PipelineMetrics

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    metrics.record_gold({"gold:clicks_by_date": {"2026-11-26": 100, "2026-11-27": 10},
                         "gold:attributed_clicks_by_date": {"2026-11-26": 90, "2026-11-27": 10}})
    metrics.record_gold({"gold:clicks_by_date": {"2026-11-27": 50, "2026-11-28": 5},
                         "gold:attributed_clicks_by_date": {"2026-11-27": 20, "2026-11-28": 5}})
    series = {(s.name, s.labels["date"]): s.value for family in registry.collect() for s in family.samples
              if s.name.startswith("advx_gold_day")}
    assert series == {("advx_gold_day_clicks", "2026-11-27"): 50, ("advx_gold_day_clicks", "2026-11-28"): 5,
                      ("advx_gold_day_unmatched_clicks", "2026-11-27"): 30,
                      ("advx_gold_day_unmatched_clicks", "2026-11-28"): 0}


class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802
        _Hook.bodies.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_one_alert_fires_once_and_resolves_on_every_channel(spark, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.bodies.clear()
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    settings = dataclasses.replace(settings, conf=copy.deepcopy(settings.conf))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    settings.conf["monitoring"]["alerting"]["webhooks"] = [
        {"url": f"{base}/slack", "format": "slack"}, {"url": f"{base}/am", "format": "alertmanager"}]
    clock = [1_000_000.0]
    registry = CollectorRegistry()
    monitor = alerting.Monitor(spark, settings, monitoring.PipelineMetrics(registry), continuous=True,
                               clock=lambda: clock[0])
    started = dt.datetime.fromtimestamp(1_000_000, dt.timezone.utc)
    try:
        for n in range(6):  # steady, then a burst of malformed records for two batches, then clean again
            monitor._take(FeedBatch("impressions", 1_000_000 + 10 * n, 1000, {"malformed_record": 2}, None, {}, {}))
        assert monitor.check() == []
        for n in (6, 7):
            monitor._take(FeedBatch("impressions", 1_000_000 + 10 * n, 1000, {"malformed_record": 300}, None, {}, {}))
            clock[0] = 1_000_000 + 10 * n
            monitor.check()
        gauge = registry.get_sample_value("advx_alert_active", {
            "detector": "quarantine_ratio:malformed_record", "severity": "warning", "feed": "impressions",
            "campaign_id": ""})
        assert gauge == 1.0
        monitor._take(FeedBatch("impressions", 1_000_080, 1000, {"malformed_record": 2}, None, {}, {}))
        clock[0] = 1_000_080
        monitor.check()
    finally:
        server.shutdown()
    assert registry.get_sample_value("advx_alert_active", {
        "detector": "quarantine_ratio:malformed_record", "severity": "warning", "feed": "impressions",
        "campaign_id": ""}) is None

    actual = read_table(spark, settings, "ops/alerts").select("status", "rule", "severity", "feed", "observed",
                                                              "baseline", "started_at", "changed_at")
    opened = started + dt.timedelta(seconds=60)
    local = dict(tzinfo=None)
    expected = spark.createDataFrame([
        ("firing", "quarantine_ratio:malformed_record", "warning", "impressions", 0.3, 0.05,
         opened.astimezone().replace(**local), opened.astimezone().replace(**local)),
        ("resolved", "quarantine_ratio:malformed_record", "warning", "impressions", 0.3, 0.05,
         opened.astimezone().replace(**local), (started + dt.timedelta(seconds=80)).astimezone().replace(**local)),
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    ids = read_table(spark, settings, "ops/alerts").select("alert_id").distinct().count()
    assert ids == 1  # firing and resolved rows of the same alert share its id

    slack = [body["text"] for path, body in _Hook.bodies if path == "/slack"]
    assert slack == [
        ":warning: [FIRING] quarantine_ratio:malformed_record (warning) impressions: 30.0% of the batch broke "
        "malformed_record (300 of 1,000)",
        ":white_check_mark: [RESOLVED] quarantine_ratio:malformed_record (warning) impressions: 30.0% of the batch "
        "broke malformed_record (300 of 1,000)",
    ]
    am = [body for path, body in _Hook.bodies if path == "/am"]
    assert [(b[0]["labels"]["alertname"], b[0]["labels"]["severity"], "endsAt" in b[0]) for b in am] == [
        ("quarantine_ratio:malformed_record", "warning", False), ("quarantine_ratio:malformed_record", "warning", True)]


def test_a_restarted_monitor_keeps_the_baselines_in_ops_metrics(spark, tmp_path):
    """A restart would otherwise judge its first batches against nothing: a steady feed's history
    comes back from ops/metrics, newest HISTORY batches per feed, and so does gold's."""
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    path = settings.table("ops/metrics")
    start = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc)
    newest = dt.datetime(2026, 11, 20, 11, 59, tzinfo=dt.timezone.utc)
    rows = []
    for n in range(alerting.HISTORY + 2):  # two more than the monitor keeps: the oldest two stay out
        account = monitoring.BatchAccount("impressions", n, rows_in=1000 + n, rows_quarantined=2,
                                          quarantine_by_rule={"malformed_record": 2}, max_event_time=newest,
                                          by_campaign={"silver:impressions": {"cmp-1": 998 + n}})
        rows.append(monitoring.metrics_row(account, "advx_impressions", "q1", start + dt.timedelta(seconds=10 * n),
                                           4000))
    (spark.createDataFrame(rows, monitoring.METRICS_SCHEMA)
     .unionByName(monitoring.query_metrics_frame(spark, "advx_gold", "q2", 0, start, 30000, 5000,
                                                 {"gold:clicks": {"cmp-1": 12}}))
     .write.format("delta").save(path))

    monitor = alerting.Monitor(spark, settings, monitoring.PipelineMetrics(CollectorRegistry()), continuous=True)
    restored = list(monitor.history.feeds["impressions"])
    assert [b.rows_in for b in restored] == [1000 + n for n in range(2, alerting.HISTORY + 2)]
    assert restored[0].started_at == (start + dt.timedelta(seconds=20)).timestamp()
    assert restored[0].max_event_time == newest.timestamp()
    assert restored[0].quarantine_by_rule == {"malformed_record": 2}
    assert restored[0].by_campaign == {"silver:impressions": {"cmp-1": 1000}}
    assert {b.interval for b in restored[1:]} == {10}
    assert list(monitor.history.gold) == [{"gold:clicks": {"cmp-1": 12}}]
    assert monitor.history.last_data == {}  # silence counts from this start
    assert evaluate(monitor.history, monitor.conf, start.timestamp() + 600, continuous=False) == []
