"""Streaming gold replaces only the hours a micro-batch can change. These cases change an hour that
none of the batch's own events or candidates lie in; the stream must still end with the backfill's
gold."""
from __future__ import annotations

import datetime as dt
import glob
import os
import shutil
from decimal import Decimal

import pytest
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


def test_settled_auctions_recount_only_the_hours_that_changed(spark, tmp_path):
    """The wins check's figures are kept from batch to batch: a call reads the bid requests newer
    than the newest it saw and the impressions of the hours it is told changed. With the right
    hours it gives what a fresh count gives; an hour it is not told of keeps its earlier count."""
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    pipeline.ensure_silver_tables(spark, settings, pipeline.privacy_from(settings))
    (spark.createDataFrame([(DAY, 9, 1), (DAY, 10, 2), (DAY, 11, 1), (DAY, 12, 5)],
                           "event_date date, event_hour int, wins long")
     .write.format("delta").save(settings.table("gold/bid_funnel_hourly")))

    def impression(name: str, hh: int, mm: int, auction: str | None, ivt: bool = False) -> dict:
        return {"impression_id": name, "event_time": at(hh, mm), "event_hour": hh, "auction_id": auction,
                "is_ivt": ivt}

    def bid(name: str, hh: int, mm: int, ivt: bool = False) -> dict:
        return {"auction_id": name, "event_time": at(hh, mm), "event_hour": hh, "is_ivt": ivt}

    def figures(auctions, changed_hours):
        return auctions.figures(spark, settings, DAY, backfill.load_silver(spark, settings), changed_hours)

    append_silver(spark, settings, "impressions", [
        impression("i1", 9, 30, "a1"), impression("i2", 10, 15, "a2"), impression("i3", 10, 20, None),
        impression("i4", 10, 40, "a4", ivt=True)])
    # The newest bid request that counts is b1 at 11:03 (b2, later, is IVT): hours before 10:58's are settled.
    append_silver(spark, settings, "bid_requests", [bid("b1", 11, 3), bid("b2", 12, 10, ivt=True)])
    kept = correlation.SettledAuctions()
    expected = {"gold:won_impressions": {"*": 1}, "gold:wins": {"*": 1}}  # i1; hour 9's win
    assert figures(kept, None) == expected
    assert figures(correlation.SettledAuctions(), None) == expected

    # b3 settles hours 10 and 11; i5 lands late in hour 9, i6 in hour 11.
    append_silver(spark, settings, "bid_requests", [bid("b3", 12, 30)])
    append_silver(spark, settings, "impressions", [impression("i5", 9, 45, "a5"), impression("i6", 11, 10, "a6")])
    expected = {"gold:won_impressions": {"*": 4}, "gold:wins": {"*": 4}}  # i1, i5, i2, i6; wins of hours 9-11
    assert figures(kept, [9, 11, 12]) == expected
    assert figures(correlation.SettledAuctions(), None) == expected

    # i7 in hour 10, but the call is told only of hour 11: hour 10 keeps its count.
    append_silver(spark, settings, "impressions", [impression("i7", 10, 50, "a7")])
    assert figures(kept, [11]) == expected
    assert figures(kept, [10])["gold:won_impressions"] == {"*": 5}
    assert figures(correlation.SettledAuctions(), None)["gold:won_impressions"] == {"*": 5}

    # No bid request on a day: nothing to judge.
    assert correlation.SettledAuctions().figures(
        spark, settings, DAY + dt.timedelta(days=1), backfill.load_silver(spark, settings)) == {}


def test_a_batch_of_clicks_reads_nothing_before_its_earliest_click(spark, tmp_path):
    """A batch whose changed clicks are all its own reads clicks, conversion candidates and
    conversions from its earliest click on. The morning's files are deleted before it runs, so
    reading one would fail; the afternoon's follower and conversion are still found."""
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    pipeline.ensure_silver_tables(spark, settings, pipeline.privacy_from(settings))
    correlation.ensure_tables(spark, settings)
    lake_files = lambda: set(glob.glob(f"{settings.lake}/**/*.parquet", recursive=True))  # noqa: E731

    def add_candidates(rows):
        (spark.createDataFrame([(kind, event, DAY, "c1", match, time, None) for kind, event, match, time in rows],
                               correlation.CANDIDATE_SCHEMA)
         .write.format("delta").mode("append").save(settings.table(correlation.CANDIDATES_TABLE)))

    before = lake_files()
    # The morning: u0 clicks at 08:00 and converts at 08:30 through that click.
    append_silver(spark, settings, "clicks", [
        {"event_id": "k0", "event_time": at(8, 0), "event_hour": 8, "user_key": "u0"}])
    append_silver(spark, settings, "conversions", [
        {"event_id": "v0", "event_time": at(8, 30), "event_hour": 8, "user_key": "u0"}])
    add_candidates([("conversion_click", "v0", "k0", at(8, 0))])
    morning = lake_files() - before
    # The afternoon: u1's click k2 at 14:00:06, 6 s after k1, and v1 at 16:00 through k2.
    append_silver(spark, settings, "clicks", [
        {"event_id": "k2", "event_time": at(14, 0, 6), "event_hour": 14, "user_key": "u1"}])
    append_silver(spark, settings, "conversions", [
        {"event_id": "v1", "event_time": at(16, 0), "event_hour": 16, "user_key": "u1"}])
    add_candidates([("conversion_click", "v1", "k2", at(14, 0, 6))])
    # The batch: click k1 at 14:00 arrives; k2 may now repeat it, and v1's touch may change.
    append_silver(spark, settings, "clicks", [
        {"event_id": "k1", "event_time": at(14, 0), "event_hour": 14, "user_key": "u1"}])
    events = spark.createDataFrame([("new_clicks", "k1", DAY, at(14, 0))],
                                   "kind string, event_id string, event_date date, event_time timestamp")

    assert correlation.affected_hours(spark, settings, events, backfill.silver_versions(spark, settings)) == {DAY: [14, 16]}
    for name in morning:
        os.remove(name)
    assert correlation.affected_hours(spark, settings, events, backfill.silver_versions(spark, settings)) == {DAY: [14, 16]}
    # A batch holding an impression an earlier batch left out has no such bound: it reads the date.
    pinned = events.unionByName(spark.createDataFrame([("pinned_impressions", "i0", DAY, at(7, 55))], events.schema))
    with pytest.raises(Exception, match="FileNotFound|FAILED_READ_FILE|does not exist"):
        correlation.affected_hours(spark, settings, pinned, backfill.silver_versions(spark, settings))
