"""Streaming gold replaces only the hours a micro-batch can change. These cases change an hour that
none of the batch's own events or candidates lie in; the stream must still end with the backfill's
gold."""
from __future__ import annotations

import shutil
import datetime as dt
from decimal import Decimal

from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex import attribution, backfill, correlation, gold, pipeline
from conftest import read_table, run_correlation, settings_for
from test_late_data import DAY, append_silver, batch_per_commit_lake


def at(hh: int, mm: int, ss: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 16, hh, mm, ss)


def gold_tables(spark, settings) -> dict:
    return {name: read_table(spark, settings, f"gold/{name}").drop("unique_users_sketch").localCheckpoint()
            for name in gold.STREAMING_TABLES}


def test_a_batch_rebuilds_the_hours_its_events_change_through_clicks(spark, tmp_path):
    settings = batch_per_commit_lake(spark, tmp_path)
    # First commits, one micro-batch:
    # - u1: click k1 at 11:00 names impression i9, not in silver yet; conversion v1 at 13:00 touches k1.
    # - u2: impression i1 at 10:59, click k3 on it at 11:00:03, conversion v2 at 12:30 touches k3.
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i1", "event_time": at(10, 59), "event_hour": 10, "user_key": "u2", "website": "w1",
         "cost": Decimal("0.002")}])
    append_silver(spark, settings, "clicks", [
        {"event_id": "k1", "event_time": at(11, 0), "event_hour": 11, "user_key": "u1", "impression_id": "i9"},
        {"event_id": "k3", "event_time": at(11, 0, 3), "event_hour": 11, "user_key": "u2", "impression_id": "i1"}])
    append_silver(spark, settings, "conversions", [
        {"event_id": "v1", "event_time": at(13, 0), "event_hour": 13, "user_key": "u1", "conversion_type": "signup"},
        {"event_id": "v2", "event_time": at(12, 30), "event_hour": 12, "user_key": "u2", "conversion_type": "signup"}])
    append_silver(spark, settings, "bid_requests", [
        {"auction_id": "a1", "event_time": at(10, 58), "event_hour": 10, "has_bid": False}])
    # Later commits:
    # - i9 arrives (10:50, site w9): k1's impression, so v1 at 13:00 now takes w9. i9 is two hours
    #   before v1, not a view-through touch: nothing in the batch lies in v1's hour.
    # - u2's click k2 on i1 arrives, 5 s before k3: k3 becomes a repeat click (IVT) in hour 11, and
    #   v2 now touches k2.
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i9", "event_time": at(10, 50), "event_hour": 10, "user_key": "u1", "website": "w9",
         "cost": Decimal("0.003")}])
    append_silver(spark, settings, "clicks", [
        {"event_id": "k2", "event_time": at(10, 59, 58), "event_hour": 10, "user_key": "u2", "impression_id": "i1"}])

    run_correlation(spark, settings)
    streamed = gold_tables(spark, settings)

    hourly = streamed["campaign_performance_hourly"].select(
        "event_hour", "website", "impressions", "clicks", "conversions", "ivt_clicks")
    expected = spark.createDataFrame([
        (10, "w1", 1, 0, 0, 0), (10, "w9", 1, 0, 0, 0),  # the impressions
        (10, "w1", 0, 1, 0, 0),  # k2
        (11, "w9", 0, 1, 0, 0),  # k1, on i9
        (11, None, 0, 0, 0, 1),  # k3, a repeat of k2: IVT, attributed to no impression
        (12, "w1", 0, 0, 1, 0),  # v2, through k2
        (13, "w9", 0, 0, 1, 0),  # v1, through k1 on i9
    ], hourly.schema)
    by_key = ["event_hour", "website"]
    summed = hourly.groupBy(*by_key).agg(*[F.sum(c).alias(c) for c in hourly.columns if c not in by_key])
    assert_df_equality(summed, expected.groupBy(*by_key).agg(*[F.sum(c).alias(c) for c in hourly.columns
                                                                if c not in by_key]),
                       ignore_row_order=True, ignore_nullable=True)
    conversions = streamed["attributed_conversions"].select("conversion_id", "click_id", "impression_id")
    assert_df_equality(conversions, spark.createDataFrame([("v1", "k1", "i9"), ("v2", "k2", "i1")], conversions.schema),
                       ignore_row_order=True, ignore_nullable=True)

    backfill.run(spark, settings, DAY, DAY, progress=False)
    for name, df in gold_tables(spark, settings).items():
        assert_df_equality(streamed[name], df, ignore_row_order=True, ignore_nullable=True)

    # A lake from before the hourly parts: gold without gold/_daily_parts. The next batch touches
    # one hour of the date; the date's parts must be rebuilt whole, or its daily rows would hold
    # that hour alone.
    shutil.rmtree(settings.table(f"gold/{gold.PARTS_TABLE}"))
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i20", "event_time": at(20, 0), "event_hour": 20, "user_key": "u5", "website": "w1",
         "cost": Decimal("0.004")}])
    run_correlation(spark, settings)
    daily = read_table(spark, settings, "gold/campaign_performance_daily").select(
        "impressions", "clicks", "conversions", F.col("spend").cast("double").alias("spend"))
    assert_df_equality(daily, spark.createDataFrame([(3, 2, 2, 0.009)], daily.schema), ignore_nullable=True)


def test_the_hours_an_impression_left_out_of_gold_changes(spark, tmp_path):
    """An earlier batch stopped inside a silver commit and built gold without impression i9; the
    clicks and conversions attributed to it were rebuilt without its dimensions. Once the commit is
    in, their hours are affected, and so are those of the clicks that may repeat them and the
    conversions that may touch those."""
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    pipeline.ensure_silver_tables(spark, settings, pipeline.privacy_from(settings))
    correlation.ensure_tables(spark, settings)
    append_silver(spark, settings, "clicks", [
        {"event_id": "k1", "event_time": at(11, 59, 58), "event_hour": 11, "user_key": "u1", "impression_id": "i9"},
        {"event_id": "k5", "event_time": at(12, 0, 4), "event_hour": 12, "user_key": "u1"},  # 6 s after k1
        {"event_id": "k7", "event_time": at(14, 30), "event_hour": 14, "user_key": "u7"}])
    append_silver(spark, settings, "conversions", [
        {"event_id": "v1", "event_time": at(13, 0), "event_hour": 13, "user_key": "u1"},
        {"event_id": "v2", "event_time": at(15, 30), "event_hour": 15, "user_key": "u1"},
        {"event_id": "v3", "event_time": at(18, 0), "event_hour": 18, "user_key": "u7"}])
    candidates = [
        ("click_by_id", "k1", "i9"),
        ("conversion_click", "v1", "k5"),  # k5 may become a repeat of k1
        ("conversion_view", "v2", "i9"),
        ("conversion_click", "v3", "k7"),  # unrelated
    ]
    (spark.createDataFrame([(kind, event, DAY, "c1", match, None, None) for kind, event, match in candidates],
                           correlation.CANDIDATE_SCHEMA)
     .write.format("delta").mode("append").save(settings.table(correlation.CANDIDATES_TABLE)))
    events = spark.createDataFrame([("pinned_impressions", "i9", DAY, at(10, 50))],
                                   "kind string, event_id string, event_date date, event_time timestamp")

    hours = correlation.affected_hours(spark, settings, events, backfill.silver_versions(spark, settings))
    # i9 itself (10), k1 (11), k5 (12), v1 through k5 (13), v2 through i9 (15); not v3 (18) or k7.
    assert hours == {DAY: [10, 11, 12, 13, 15]}


def test_an_hour_reads_only_the_hours_that_explain_it(spark):
    """The filters that keep an hour's rebuild from reading its whole lookback: the win candidates'
    match times (consecutive hours merge into one range, plus the bid-request window), and the
    hours of clicks it resolves (a conversion's candidate clicks, and the hour that reaches the
    repeat-click window back before each)."""
    day = dt.date(2026, 11, 16)
    times = spark.createDataFrame(
        [(t,) for t in [at(2, 59, 59), at(3, 0), at(5, 30), at(6, 5), at(6, 5, 1), at(8, 59), at(9, 0), at(10, 5),
                        at(10, 6)]], "match_time timestamp")
    kept = times.filter(gold.matched_within({day: [3, 4, 5, 9]}, "5 minutes")).collect()
    assert sorted(r["match_time"] for r in kept) == [at(3, 0), at(5, 30), at(6, 5), at(9, 0), at(10, 5)]

    windows = attribution.Windows()  # repeat_click 10 seconds
    conversions = spark.createDataFrame([("v1",), ("v2",)], "event_id string")
    candidates = spark.createDataFrame([
        ("conversion_click", "v1", day, "c1", "k1", at(7, 30), None),   # a click the hour's conversion may touch
        ("conversion_click", "v9", day, "c1", "k9", at(15, 0), None),   # another conversion's: not needed
        ("click_by_id", "k5", day, "c1", "i1", at(16, 0), None),        # a click's impression, not a touch
    ], correlation.CANDIDATE_SCHEMA)
    needed = gold.click_hours({day: [0, 12]}, conversions, candidates, windows)
    assert needed == {day - dt.timedelta(days=1): [23], day: [0, 6, 7, 11, 12]}
