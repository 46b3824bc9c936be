"""Anomaly detectors: pure functions over a metric history, each returning an ``Alert`` or None.

Every detector takes plain Python values (a series of per-batch counts, a few totals) and its
thresholds from the ``monitoring`` conf section, so it runs the same on a hand-made series in a
unit test and on the ``ops/metrics`` history of a running pipeline. None of them reads Spark.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

WARNING, CRITICAL = "warning", "critical"


@dataclass(frozen=True)
class Alert:
    """One firing condition: what, how bad, where, and the value against its baseline."""

    rule: str
    severity: str
    feed: str | None
    campaign: str | None
    observed: float
    baseline: float | None
    message: str

    @property
    def key(self) -> tuple:
        """Identity of the condition: a repeat with the same key is the same open alert."""
        return (self.rule, self.feed, self.campaign)


def ewma(values: Sequence[float], alpha: float) -> float:
    level = values[0]
    for value in values[1:]:
        level = alpha * value + (1 - alpha) * level
    return level


def _robust_sigma(values: Sequence[float]) -> float:
    """1.4826 x the median absolute deviation: a standard deviation that one outlier cannot inflate."""
    centre = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - centre) for v in values)


def volume(series: Sequence[float], conf: dict, feed: str, campaign: str | None = None) -> Alert | None:
    """A spike or a drop of the newest rate (records per second) against a baseline of the ones before.

    The baseline is an EWMA of the history with each value first clipped into the history's own
    band, so one spike does not lift the baseline and make the next normal batch look like a drop.
    The band is ``z`` robust standard deviations (MAD), but never narrower than ``min_relative``
    of the centre: a perfectly steady history must not turn a 1 % wobble into an alert.
    """
    history, latest = list(series[:-1]), series[-1] if series else None
    if latest is None or len(history) < conf["min_history"]:
        return None
    centre = statistics.median(history)
    clip = max(conf["z"] * _robust_sigma(history), conf["min_relative"] * abs(centre), 1.0)
    baseline = ewma([min(max(v, centre - clip), centre + clip) for v in history], conf["ewma_alpha"])
    band = max(conf["z"] * _robust_sigma(history), conf["min_relative"] * abs(baseline), 1.0)
    if abs(latest - baseline) <= band:
        return None
    rule = "volume_spike" if latest > baseline else "volume_drop"
    severity = CRITICAL if latest == 0 or abs(latest - baseline) > 2 * band else WARNING
    where = f"{feed}" + (f"/{campaign}" if campaign else "")
    return Alert(rule, severity, feed, campaign, float(latest), float(baseline),
                 f"{where}: {latest:,.1f} records/s against a baseline of {baseline:,.1f}/s")


def stale_feed(seconds_since_data: float, conf: dict, feed: str) -> Alert | None:
    """No new record on a feed for longer than ``max_silence_seconds``."""
    limit = conf["max_silence_seconds"]
    if seconds_since_data <= limit:
        return None
    return Alert("feed_stale", CRITICAL, feed, None, float(seconds_since_data), float(limit),
                 f"{feed}: no new data for {seconds_since_data:,.0f} s (limit {limit:,.0f} s)")


def event_time_lag(lag_seconds: float, conf: dict, feed: str) -> Alert | None:
    """The newest event seen is older than ``max_event_lag_seconds``: the data arrives late."""
    limit = conf["max_event_lag_seconds"]
    if lag_seconds <= limit:
        return None
    return Alert("event_time_lag", WARNING, feed, None, float(lag_seconds), float(limit),
                 f"{feed}: event-time lag {lag_seconds:,.0f} s (limit {limit:,.0f} s)")


def behind(arrived: float, processed: float, ratio: float) -> bool:
    """A batch processed its rows slower than ``ratio`` x the rate they arrived at."""
    return processed < arrived * ratio


def falling_behind(input_rates: Sequence[float], processed_rates: Sequence[float], conf: dict,
                   feed: str) -> Alert | None:
    """Processing below ``behind_ratio`` of the input rate for the last ``behind_batches`` batches in a row.

    A query that is merely busy runs its batches back to back, and its two rates then differ by
    the noise in batch durations; only a clear gap, batch after batch, means a growing backlog.
    """
    n = conf["behind_batches"]
    pairs = list(zip(input_rates, processed_rates, strict=True))[-n:]
    if len(pairs) < n or not all(behind(arrived, processed, conf["behind_ratio"]) for arrived, processed in pairs):
        return None
    arrived, processed = pairs[-1]
    return Alert("falling_behind", WARNING, feed, None, float(processed), float(arrived),
                 f"{feed}: processing {processed:,.0f} rows/s against {arrived:,.0f} rows/s arriving, "
                 f"{n} batches in a row")


def quarantine_ratio(rows_in: int, quarantined_by_rule: dict[str, int], conf: dict, feed: str) -> list[Alert]:
    """Each rule whose share of the batch's input exceeds ``max_quarantine_ratio``."""
    if rows_in < conf["min_rows_for_ratio"]:
        return []
    alerts = []
    for rule, count in sorted(quarantined_by_rule.items()):
        ratio = count / rows_in
        if ratio > conf["max_quarantine_ratio"]:
            alerts.append(Alert(f"quarantine_ratio:{rule}", CRITICAL if ratio > 0.5 else WARNING, feed, None,
                                ratio, conf["max_quarantine_ratio"],
                                f"{feed}: {ratio:.1%} of the batch broke {rule} ({count:,} of {rows_in:,})"))
    return alerts


def new_rule_firing(history: Sequence[dict[str, int]], latest: dict[str, int], conf: dict, feed: str) -> list[Alert]:
    """A rule that never fired in the last ``min_history`` batches suddenly does, above ``new_rule_min_rows``."""
    if len(history) < conf["min_history"]:
        return []
    seen = {rule for batch in history for rule, count in batch.items() if count}
    return [Alert(f"new_rule:{rule}", WARNING, feed, None, float(count), 0.0,
                  f"{feed}: {rule} fired {count:,} times; it had not fired in {len(history)} batches")
            for rule, count in sorted(latest.items()) if rule not in seen and count >= conf["new_rule_min_rows"]]


def schema_drift(unknown_fields: dict[str, int], conf: dict, feed: str) -> Alert | None:
    """Fields the contract does not name appear in records (counted per field name)."""
    drifting = {name: n for name, n in unknown_fields.items() if n >= conf["schema_drift_min_rows"]}
    if not drifting:
        return None
    names = ", ".join(sorted(drifting))
    return Alert("schema_drift", WARNING, feed, None, float(sum(drifting.values())), 0.0,
                 f"{feed}: fields not in the contract: {names}")


def _rate_alert(rule: str, part: int, whole: int, limit: float, min_rows: int, feed: str | None,
                campaign: str | None, what: str) -> Alert | None:
    if whole < min_rows:
        return None
    ratio = part / whole
    if ratio <= limit:
        return None
    return Alert(rule, CRITICAL if ratio > 2 * limit else WARNING, feed, campaign, ratio, limit,
                 f"{what}: {ratio:.1%} ({part:,} of {whole:,}; limit {limit:.1%})")


def unmatched_clicks(unmatched: int, clicks: int, conf: dict, campaign: str | None = None,
                     day: str | None = None) -> Alert | None:
    """Clicks that match no impression (match_type none) above ``max_unmatched_click_ratio``."""
    return _rate_alert("clicks_without_impression", unmatched, clicks, conf["max_unmatched_click_ratio"],
                       conf["min_clicks_for_unmatched"], "clicks_conversions", campaign,
                       f"clicks with no impression{f' in {campaign}' if campaign else ''}{f' on {day}' if day else ''}")


def wins_without_bid_request(orphan_wins: int, wins: int, conf: dict) -> Alert | None:
    """Impressions that carry an auction_id with no bid request in silver."""
    return _rate_alert("wins_without_bid_request", orphan_wins, wins, conf["max_orphan_win_ratio"],
                       conf["min_rows_for_ratio"], "bid_requests", None, "impressions won in auctions nobody saw")


def conversions_exceed_clicks(conversions: int, clicks: int, conf: dict, campaign: str) -> Alert | None:
    """More conversions than clicks for a campaign on a date (view-through aside, a tracking fault)."""
    if clicks + conversions < conf["min_rows_for_ratio"] or conversions <= clicks * conf["max_conversions_per_click"]:
        return None
    return Alert("conversions_exceed_clicks", WARNING, "clicks_conversions", campaign, float(conversions),
                 float(clicks), f"{campaign}: {conversions:,} conversions against {clicks:,} clicks")


def unknown_creatives(unknown: int, impressions: int, conf: dict) -> Alert | None:
    """Impressions quarantined because their creative is not in the dimension."""
    return _rate_alert("unknown_creative", unknown, impressions, conf["max_unknown_creative_ratio"],
                       conf["min_rows_for_ratio"], "impressions", None, "impressions with an unknown creative")


def ctr_jump(history: Sequence[float], clicks: int, impressions: int, conf: dict, campaign: str) -> Alert | None:
    """A campaign's CTR far above its own baseline: a possible click-fraud burst."""
    if impressions < conf["min_rows_for_ratio"] or len(history) < conf["min_history"]:
        return None
    ctr = clicks / impressions
    baseline = ewma(list(history), conf["ewma_alpha"])
    if ctr <= baseline * conf["max_ctr_multiple"] or math.isclose(ctr, 0.0):
        return None
    return Alert("ctr_jump", CRITICAL, "clicks_conversions", campaign, ctr, baseline,
                 f"{campaign}: CTR {ctr:.2%} against its baseline {baseline:.2%}")


def kafka_data_loss(lost_offsets: int, feed: str) -> Alert | None:
    """Any offset Kafka deleted before the pipeline read it (see monitoring.QueryListener)."""
    if lost_offsets <= 0:
        return None
    return Alert("kafka_data_loss", CRITICAL, feed, None, float(lost_offsets), 0.0,
                 f"{feed}: {lost_offsets:,} Kafka offsets were gone before they were read")


def watermark_drops(dropped: int, rows_in: int, conf: dict) -> Alert | None:
    """Rows the correlation's watermark dropped above ``max_watermark_drop_ratio`` of its input."""
    return _rate_alert("dropped_by_watermark", dropped, rows_in, conf["max_watermark_drop_ratio"],
                       conf["min_rows_for_ratio"], "gold", None, "join rows dropped by the watermark")


# -- alert lifecycle ------------------------------------------------------------------------------

@dataclass
class AlertBook:
    """Open alerts by key. A condition that keeps firing stays one open alert (its repeats are
    suppressed); when it stops firing it resolves. ``update`` says what changed."""

    open: dict[tuple, tuple[Alert, str]]

    def __init__(self):
        self.open = {}

    def update(self, firing: Sequence[Alert], now: str, checked: set[tuple] | None = None
               ) -> tuple[list[Alert], list[tuple[Alert, str]]]:
        """(newly firing alerts, (resolved alert, when it started) pairs).

        ``checked`` limits resolution to the keys whose detectors ran this time (a detector that
        did not run, e.g. for lack of history, does not resolve its alert); None means all.
        """
        new = []
        current = {alert.key: alert for alert in firing}
        for key, alert in current.items():
            if key not in self.open:
                self.open[key] = (alert, now)
                new.append(alert)
        resolved = []
        for key in list(self.open):
            if key not in current and (checked is None or key in checked):
                resolved.append(self.open.pop(key))
        return new, resolved


def alertmanager_payload(alert: Alert, status: str, starts_at: str, ends_at: str | None = None) -> list[dict]:
    """The body Alertmanager's POST /api/v2/alerts accepts (a list of alerts)."""
    labels = {"alertname": alert.rule, "severity": alert.severity, "service": "advertisex-lakehouse"}
    if alert.feed:
        labels["feed"] = alert.feed
    if alert.campaign:
        labels["campaign"] = alert.campaign
    body = {
        "labels": labels,
        "annotations": {"summary": alert.message, "observed": f"{alert.observed:g}",
                        "baseline": "" if alert.baseline is None else f"{alert.baseline:g}"},
        "startsAt": starts_at,
    }
    if status == "resolved" and ends_at:
        body["endsAt"] = ends_at
    return [body]


def slack_payload(alert: Alert, status: str) -> dict:
    """A Slack incoming-webhook message (``text``), which Slack-compatible receivers also accept."""
    icon = {"firing": ":rotating_light:" if alert.severity == CRITICAL else ":warning:", "resolved": ":white_check_mark:"}
    return {"text": f"{icon[status]} [{status.upper()}] {alert.rule} ({alert.severity}) {alert.message}"}
