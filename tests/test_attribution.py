"""SPEC §3 attribution rules and the multi-touch models on hand-built events with known answers."""
from __future__ import annotations

import datetime as dt

from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from advertisex import attribution, correlation, gold
from advertisex.attribution import Windows

DAY = dt.date(2026, 11, 16)
IMPRESSIONS = (
    "impression_id string, event_time timestamp, event_date date, event_hour int, campaign_id string, creative_id string, "
    "user_key string, website string, country string, device_type string, auction_id string, cost decimal(18,6), "
    "is_ivt boolean, ivt_reason string"
)
CLICKS = (
    "event_id string, event_time timestamp, event_date date, event_hour int, campaign_id string, creative_id string, "
    "impression_id string, user_key string, is_ivt boolean, ivt_reason string"
)
CONVERSIONS = (
    "event_id string, event_time timestamp, event_date date, event_hour int, campaign_id string, creative_id string, "
    "impression_id string, conversion_type string, conversion_value decimal(18,6), user_key string, is_ivt boolean, "
    "ivt_reason string"
)


def at(hh: int, mm: int, ss: int = 0, ms: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 16, hh, mm, ss, ms * 1000)


def impression(spark_id: str, ts: dt.datetime, user: str, ivt: bool = False, creative: str = "cr-1", site: str = "a.example"):
    return (spark_id, ts, ts.date(), ts.hour, "c1", creative, user, site, "DE", "desktop", None, None, ivt,
            "bot_user_agent" if ivt else None)


def click(event_id: str, ts: dt.datetime, user: str, impression_id: str | None = None):
    return (event_id, ts, ts.date(), ts.hour, "c1", "cr-1", impression_id, user, False, None)


def conversion(event_id: str, ts: dt.datetime, user: str):
    return (event_id, ts, ts.date(), ts.hour, "c1", None, None, "signup", None, user, False, None)


def test_click_and_conversion_attribution_rules(spark):
    windows = Windows()
    impressions = spark.createDataFrame([
        impression("i1", at(10, 0), "u1"),
        impression("i2", at(10, 10), "u1"),
        impression("i-bot", at(10, 15), "u1", ivt=True),   # IVT: never a candidate
        impression("i3", at(12, 0), "u2"),
        impression("i4", at(13, 0), "u3"),
        impression("i5", at(14, 0), "u5"),
        impression("i6", at(9, 0), "u4", ivt=True),
    ], IMPRESSIONS)
    clicks = spark.createDataFrame([
        click("k-named", at(10, 20), "u1", "i1"),          # names i1: it wins over the later i2 in the window
        click("k-window", at(10, 20, 1), "u1"),           # no id: latest of i1, i2 in the window (i-bot is IVT)
        click("k-repeat", at(10, 20, 5), "u1", "i1"),      # same user and impression 5 s after k-named
        click("k-edge", at(12, 30), "u2"),                 # exactly impression_time + 30 min: in
        click("k-outside", at(13, 30, 0, 1), "u3"),        # 1 ms past the window: none
        click("k-early", at(12, 59), "u3", "i4"),          # before the impression it names: IVT
        click("k-ivt-named", at(9, 5), "u4", "i6"),        # names an IVT impression: no match
    ], CLICKS)
    conversions = spark.createDataFrame([
        conversion("v-click", at(11, 0), "u1"),            # latest counted click is k-window (k-repeat is IVT)
        conversion("v-view", at(14, 59, 59), "u5"),        # no click; i5 less than 1 h before: view
        conversion("v-view-late", at(15, 0, 0, 1), "u5"),  # 1 h and 1 ms after i5: none
        conversion("v-none", at(15, 0), "u9"),             # no touch at all
    ], CONVERSIONS)
    candidates = (
        attribution.click_candidates(clicks, impressions, windows)
        .unionByName(attribution.conversion_candidates(conversions, clicks, impressions, windows))
    )
    resolved = attribution.resolve_clicks(clicks, candidates, windows)
    actual = resolved.select("event_id", "match_type", "matched_impression_id", "is_ivt", "ivt_reason")
    expected = spark.createDataFrame([
        ("k-named", "impression_id", "i1", False, None),
        ("k-window", "window", "i2", False, None),
        ("k-repeat", None, None, True, "repeat_click"),
        ("k-edge", "window", "i3", False, None),
        ("k-outside", "none", None, False, None),
        ("k-early", None, None, True, "click_before_impression"),
        ("k-ivt-named", "none", None, False, None),
    ], "event_id string, match_type string, matched_impression_id string, is_ivt boolean, ivt_reason string")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)

    touched = attribution.resolve_conversions(conversions, candidates, resolved)
    actual = gold.to_attributed_conversions(touched).select("conversion_id", "touch", "click_id", "impression_id")
    expected = spark.createDataFrame([
        ("v-click", "click", "k-window", "i2"),
        ("v-view", "view", None, "i5"),
        ("v-view-late", "none", None, None),
        ("v-none", "none", None, None),
    ], "conversion_id string, touch string, click_id string, impression_id string")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_wins_need_a_bid_and_an_impression_within_five_minutes(spark):
    windows = Windows()
    bids = spark.createDataFrame([
        ("a-won", at(10, 0), DAY, True, "c1", False),
        ("a-late", at(10, 0), DAY, True, "c1", False),     # impression 5 min 1 ms later: not a win
        ("a-nobid", at(10, 0), DAY, False, None, False),
        ("a-lost", at(10, 0), DAY, True, "c1", False),
    ], "auction_id string, event_time timestamp, event_date date, has_bid boolean, bid_campaign_id string, is_ivt boolean")
    impressions = spark.createDataFrame([
        ("i1", at(10, 5), "u1", "c1", 0.0021, "a-won", False),
        ("i2", at(10, 5, 0, 1), "u1", "c1", 0.0030, "a-late", False),
        ("i3", at(10, 1), "u1", "c1", 0.0010, "a-nobid", False),
    ], "impression_id string, event_time timestamp, user_key string, campaign_id string, cost double, auction_id string, "
       "is_ivt boolean").withColumn("cost", F.col("cost").cast("decimal(18,6)"))
    resolved = attribution.resolve_wins(bids, attribution.win_candidates(bids, impressions, windows))
    actual = resolved.select("auction_id", "won", F.col("clearing_price").cast("double").alias("clearing_price"))
    expected = spark.createDataFrame([
        ("a-won", True, 0.0021), ("a-late", False, None), ("a-nobid", False, None), ("a-lost", False, None),
    ], "auction_id string, won boolean, clearing_price double")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_multi_touch_models_on_worked_examples(spark):
    """Worked by hand (half-life 24 h):
    x: touches at 0 h, 24 h, 48 h, conversion at 48 h. time_decay weights 1/4, 1/2, 1 -> 1/7, 2/7, 4/7;
       position_based 0.4, 0.2, 0.4; linear 1/3 each.
    y: touches at 0 h and 24 h, conversion at 24 h. time_decay 1/2, 1 -> 1/3, 2/3; position_based 0.5, 0.5.
    z: one touch: 1 in every model.
    """
    t0 = dt.datetime(2026, 11, 14)
    hours = dt.timedelta(hours=1)
    touches = spark.createDataFrame([
        ("x", t0 + 48 * hours, "x1", t0), ("x", t0 + 48 * hours, "x2", t0 + 24 * hours), ("x", t0 + 48 * hours, "x3", t0 + 48 * hours),
        ("y", t0 + 24 * hours, "y1", t0), ("y", t0 + 24 * hours, "y2", t0 + 24 * hours),
        ("z", t0 + 5 * hours, "z1", t0),
    ], "conversion_id string, conversion_time timestamp, touch_id string, touch_time timestamp")
    actual = attribution.with_touch_credits(touches, "24 hours").select("conversion_id", "touch_id", "model", "credit")
    hand = {
        "x1": {"first_touch": 1, "last_touch": 0, "linear": 1 / 3, "time_decay": 1 / 7, "position_based": 0.4},
        "x2": {"first_touch": 0, "last_touch": 0, "linear": 1 / 3, "time_decay": 2 / 7, "position_based": 0.2},
        "x3": {"first_touch": 0, "last_touch": 1, "linear": 1 / 3, "time_decay": 4 / 7, "position_based": 0.4},
        "y1": {"first_touch": 1, "last_touch": 0, "linear": 0.5, "time_decay": 1 / 3, "position_based": 0.5},
        "y2": {"first_touch": 0, "last_touch": 1, "linear": 0.5, "time_decay": 2 / 3, "position_based": 0.5},
        "z1": {m: 1.0 for m in attribution.MODELS},
    }
    expected = spark.createDataFrame(
        [(touch[0], touch, model, float(credit)) for touch, credits in hand.items() for model, credit in credits.items()],
        actual.schema)
    assert_approx_df_equality(actual, expected, 1e-9, ignore_row_order=True, ignore_nullable=True)


def test_multi_touch_credits_sum_to_one_and_untouched_conversions_get_one_row(spark):
    impressions = spark.createDataFrame([
        impression("i1", at(8, 0), "u1", creative="cr-1", site="a.example"),
        impression("i2", at(9, 0), "u1", creative="cr-2", site="b.example"),
    ], IMPRESSIONS)
    clicks = spark.createDataFrame([click("k1", at(9, 1), "u1", "i2")], CLICKS)
    conversions = spark.createDataFrame([conversion("v1", at(10, 0), "u1"), conversion("v2", at(10, 0), "u7")], CONVERSIONS)
    windows = Windows()
    candidates = attribution.click_candidates(clicks, impressions, windows)
    resolved = attribution.resolve_clicks(clicks, candidates, windows)
    credits = gold.to_multi_touch(conversions, impressions, resolved, windows)
    # v1: touches i1 (cr-1, a), i2 (cr-2, b), k1 (click on i2: cr-2, b); linear 1/3 + 2/3.
    linear = credits.filter("model = 'linear'").select("conversion_id", "creative_id", "website", "credit")
    expected = spark.createDataFrame([
        ("v1", "cr-1", "a.example", 1 / 3), ("v1", "cr-2", "b.example", 2 / 3), ("v2", None, None, 1.0),
    ], linear.schema)
    assert_approx_df_equality(linear, expected, 1e-9, ignore_row_order=True, ignore_nullable=True)
    sums = credits.groupBy("conversion_id", "model").agg(F.round(F.sum("credit"), 9).alias("total"))
    expected_sums = spark.createDataFrame(
        [(v, m, 1.0) for v in ("v1", "v2") for m in attribution.MODELS], sums.schema)
    assert_df_equality(sums, expected_sums, ignore_row_order=True, ignore_nullable=True)


def test_touched_dates_become_runs_of_consecutive_dates():
    d = dt.date(2026, 11, 16)
    days = [d + dt.timedelta(days=n) for n in (0, 1, 2, 30)]
    assert correlation.date_runs(days) == [(days[0], days[2]), (days[3], days[3])]
    assert correlation.affected_dates([days[0], days[2]]) == [days[0], days[1], days[2], days[2] + dt.timedelta(days=1)]
    assert correlation.affected_dates([]) == []
    assert correlation.date_runs([]) == []
