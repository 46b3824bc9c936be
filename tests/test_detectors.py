"""Each detector on hand-made metric series: it fires on the fault, with its value and baseline,
and stays quiet on normal variation."""
from __future__ import annotations

import pytest

from advertisex import detectors as d
from advertisex.config import load_conf

CONF = load_conf(None).conf["monitoring"]["detectors"]
STEADY = [1000, 1040, 980, 1010, 990, 1020, 1000]


def test_volume_is_quiet_on_normal_variation():
    assert d.volume([*STEADY, 1060], CONF, "impressions") is None
    assert d.volume([*STEADY, 700], CONF, "impressions") is None  # within half the baseline


def test_volume_spike_and_drop_carry_value_and_baseline():
    baseline = d.ewma(STEADY, CONF["ewma_alpha"])
    assert d.volume([*STEADY, 5000], CONF, "impressions", "cmp-0001") == d.Alert(
        "volume_spike", d.CRITICAL, "impressions", "cmp-0001", 5000.0, baseline,
        f"impressions/cmp-0001: 5,000.0 records/s against a baseline of {baseline:,.1f}/s")
    drop = d.volume([*STEADY, 0], CONF, "bid_requests")
    assert (drop.rule, drop.severity, drop.observed) == ("volume_drop", d.CRITICAL, 0.0)


def test_a_spike_does_not_make_the_next_normal_batch_a_drop():
    assert d.volume([*STEADY, 9000], CONF, "impressions").rule == "volume_spike"
    assert d.volume([*STEADY, 9000, 1000], CONF, "impressions") is None


def test_volume_needs_history():
    assert d.volume([1000, 1000, 90000], CONF, "impressions") is None


def test_ewma_weights_recent_values():
    assert d.ewma([0, 0, 100], 0.5) == 50.0
    assert d.ewma([100], 0.3) == 100.0


def test_stale_feed_and_event_time_lag():
    assert d.stale_feed(120, CONF, "clicks_conversions") is None
    assert d.stale_feed(301, CONF, "clicks_conversions") == d.Alert(
        "feed_stale", d.CRITICAL, "clicks_conversions", None, 301.0, 300.0,
        "clicks_conversions: no new data for 301 s (limit 300 s)")
    assert d.event_time_lag(900, CONF, "impressions") is None
    assert d.event_time_lag(1800, CONF, "impressions").observed == 1800.0


def test_falling_behind_needs_consecutive_batches():
    assert d.falling_behind([5000, 5000, 5000], [3000, 6000, 3000], CONF, "impressions") is None
    # busy, not behind: back-to-back batches whose durations vary a little
    assert d.falling_behind([5000, 5000, 5000], [4900, 4500, 4800], CONF, "impressions") is None
    alert = d.falling_behind([5000, 5000, 5000, 5000], [6000, 3500, 3000, 2000], CONF, "impressions")
    assert (alert.rule, alert.observed, alert.baseline) == ("falling_behind", 2000.0, 5000.0)


def test_quarantine_ratio_per_rule():
    assert d.quarantine_ratio(50, {"malformed_record": 40}, CONF, "impressions") == []  # too few rows to judge
    alerts = d.quarantine_ratio(1000, {"malformed_record": 600, "invalid_timestamp": 30, "negative_amount": 51},
                                CONF, "impressions")
    assert [(a.rule, a.severity, a.observed) for a in alerts] == [
        ("quarantine_ratio:malformed_record", d.CRITICAL, 0.6),
        ("quarantine_ratio:negative_amount", d.WARNING, 0.051),
    ]


def test_a_rule_that_suddenly_fires():
    history = [{"malformed_record": 3}, {"malformed_record": 1}, {}, {"malformed_record": 2}, {}]
    assert d.new_rule_firing(history, {"malformed_record": 5, "unknown_creative": 9}, CONF, "impressions") == []
    alerts = d.new_rule_firing(history, {"malformed_record": 5, "unknown_creative": 40}, CONF, "impressions")
    assert [(a.rule, a.observed) for a in alerts] == [("new_rule:unknown_creative", 40.0)]
    assert d.new_rule_firing(history[:2], {"unknown_creative": 40}, CONF, "impressions") == []


def test_schema_drift():
    assert d.schema_drift({"gdpr": 3}, CONF, "impressions") is None
    alert = d.schema_drift({"gdpr": 30, "consent": 12, "x": 1}, CONF, "impressions")
    assert (alert.observed, alert.message) == (42.0, "impressions: fields not in the contract: consent, gdpr")


@pytest.mark.parametrize("detector, quiet, firing, rule", [
    (lambda p, w: d.unmatched_clicks(p, w, CONF, "cmp-0002"), (100, 1000), (600, 1000), "clicks_without_impression"),
    (lambda p, w: d.wins_without_bid_request(p, w, CONF), (2, 1000), (300, 1000), "wins_without_bid_request"),
    (lambda p, w: d.unknown_creatives(p, w, CONF), (10, 1000), (50, 1000), "unknown_creative"),
    (lambda p, w: d.watermark_drops(p, w, CONF), (30, 1000), (80, 1000), "dropped_by_watermark"),
])
def test_discrepancy_ratios(detector, quiet, firing, rule):
    assert detector(*quiet) is None
    alert = detector(*firing)
    assert (alert.rule, alert.observed) == (rule, firing[0] / firing[1])
    assert detector(firing[0] // 10, 50) is None  # below min_rows_for_ratio


def test_conversions_exceeding_clicks():
    assert d.conversions_exceed_clicks(30, 100, CONF, "cmp-0001") is None
    alert = d.conversions_exceed_clicks(150, 100, CONF, "cmp-0001")
    assert (alert.rule, alert.campaign, alert.observed, alert.baseline) == ("conversions_exceed_clicks", "cmp-0001", 150.0, 100.0)


def test_ctr_jump_against_the_campaigns_own_baseline():
    history = [0.020, 0.021, 0.019, 0.020, 0.022]
    assert d.ctr_jump(history, 25, 1000, CONF, "cmp-0003") is None  # 2.5 %: normal
    alert = d.ctr_jump(history, 150, 1000, CONF, "cmp-0003")
    assert (alert.rule, alert.severity, alert.observed) == ("ctr_jump", d.CRITICAL, 0.15)
    assert alert.baseline == pytest.approx(d.ewma(history, CONF["ewma_alpha"]))
    assert d.ctr_jump(history, 150, 50, CONF, "cmp-0003") is None  # too few impressions


def test_kafka_data_loss_fires_on_any_lost_offset():
    assert d.kafka_data_loss(0, "impressions") is None
    assert d.kafka_data_loss(50, "impressions") == d.Alert(
        "kafka_data_loss", d.CRITICAL, "impressions", None, 50.0, 0.0,
        "impressions: 50 Kafka offsets were gone before they were read")


def test_alert_key_ignores_the_values():
    a = d.kafka_data_loss(50, "impressions")
    b = d.kafka_data_loss(70, "impressions")
    assert a.key == b.key == ("kafka_data_loss", "impressions", None)


def test_an_open_alert_is_not_repeated_and_resolves_when_the_condition_clears():
    book = d.AlertBook()
    loss = d.kafka_data_loss(50, "impressions")
    stale = d.stale_feed(400, CONF, "clicks_conversions")
    assert book.update([loss], "t1") == ([loss], [])
    assert book.update([d.kafka_data_loss(70, "impressions"), stale], "t2") == ([stale], [])  # loss still open
    # The stale-feed detector did not run this time: its alert stays open; the loss cleared.
    assert book.update([], "t3", checked={loss.key}) == ([], [(loss, "t1")])
    assert book.update([], "t4") == ([], [(stale, "t2")])
    assert book.open == {}


def test_webhook_bodies_for_alertmanager_and_slack():
    alert = d.ctr_jump([0.02] * 5, 150, 1000, CONF, "cmp-0003")
    assert d.alertmanager_payload(alert, "firing", "2026-11-25T10:00:00Z") == [{
        "labels": {"alertname": "ctr_jump", "severity": "critical", "service": "advertisex-lakehouse",
                   "feed": "clicks_conversions", "campaign": "cmp-0003"},
        "annotations": {"summary": "cmp-0003: CTR 15.00% against its baseline 2.00%", "observed": "0.15",
                        "baseline": "0.02"},
        "startsAt": "2026-11-25T10:00:00Z",
    }]
    resolved = d.alertmanager_payload(alert, "resolved", "2026-11-25T10:00:00Z", "2026-11-25T10:05:00Z")
    assert resolved[0]["endsAt"] == "2026-11-25T10:05:00Z"
    assert d.slack_payload(alert, "firing") == {
        "text": ":rotating_light: [FIRING] ctr_jump (critical) cmp-0003: CTR 15.00% against its baseline 2.00%"}
