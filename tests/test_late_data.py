"""Late data: the stream's joins drop what arrives behind the watermark (and count it); the event
itself still counts, and the backfill of its date restores the exact attribution."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from decimal import Decimal

from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex import backfill, correlation, pipeline
from conftest import read_table, run_correlation, settings_for

DAY = dt.date(2026, 11, 16)


def at(hh: int, mm: int) -> dt.datetime:
    return dt.datetime(2026, 11, 16, hh, mm)


def append_silver(spark, settings, table: str, rows: list[dict]) -> None:
    """One commit of hand-made rows into a silver table; columns not given are NULL."""
    target = read_table(spark, settings, f"silver/{table}").schema
    defaults = {"is_ivt": False, "event_date": DAY, "campaign_id": "c1", "creative_id": "cr-1"}
    data = [tuple({**defaults, **row}.get(f.name) for f in target) for row in rows]
    spark.createDataFrame(data, target).write.format("delta").mode("append").save(settings.table(f"silver/{table}"))


def batch_per_commit_lake(spark, tmp_path):
    """Empty silver tables in a lake under ``tmp_path`` whose correlation query reads one silver
    commit per micro-batch and table; its settings."""
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    settings = dataclasses.replace(settings, conf=copy.deepcopy(settings.conf))
    settings.conf["correlation"]["max_files_per_trigger"] = 1
    pipeline.ensure_silver_tables(spark, settings, pipeline.privacy_from(settings))
    return settings


def test_a_join_partner_behind_the_watermark_is_counted_and_the_backfill_restores_it(spark, tmp_path):
    settings = batch_per_commit_lake(spark, tmp_path)
    # One silver commit per micro-batch and table. The query's watermark is the minimum over every
    # join input, and an input that has seen no row holds it at zero, so batch 0 gives each one a
    # row (a click naming an impression that does not exist, an impression with an auction, a
    # conversion and a bid). Batch 1 moves the watermark to 13:50. Batch 2 brings the impression
    # in k1's window, stamped 11:45: far behind the watermark, and k1 has left the join state.
    append_silver(spark, settings, "clicks", [
        {"event_id": "k1", "event_time": at(12, 0), "event_hour": 12, "user_key": "u1", "impression_id": "i-gone"}])
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i-now", "event_time": at(12, 0), "event_hour": 12, "user_key": "u2", "auction_id": "a1",
         "cost": Decimal("0.002")}])
    append_silver(spark, settings, "conversions", [
        {"event_id": "v1", "event_time": at(12, 0), "event_hour": 12, "user_key": "u9", "conversion_type": "signup"}])
    append_silver(spark, settings, "bid_requests", [
        {"auction_id": "a1", "event_time": at(12, 0), "event_hour": 12, "has_bid": True, "bid_campaign_id": "c1"}])
    append_silver(spark, settings, "clicks", [
        {"event_id": "k2", "event_time": at(14, 0), "event_hour": 14, "user_key": "u3", "impression_id": "i-gone"}])
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i-later", "event_time": at(14, 0), "event_hour": 14, "user_key": "u4", "cost": Decimal("0.004")}])
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i-late", "event_time": at(11, 45), "event_hour": 11, "user_key": "u1", "cost": Decimal("0.001")}])

    query = run_correlation(spark, settings)
    assert correlation.dropped_by_watermark(query) >= 1
    clicks = read_table(spark, settings, "gold/attributed_clicks").select("click_id", "impression_id", "match_type")
    expected = spark.createDataFrame([("k1", None, "none"), ("k2", None, "none")], clicks.schema)
    assert_df_equality(clicks, expected, ignore_nullable=True, ignore_row_order=True)
    # Counting needs no join: the late impression is in the stream's daily figures already.
    daily = read_table(spark, settings, "gold/campaign_performance_daily").select("impressions", "clicks", "attributed_clicks")
    assert_df_equality(daily, spark.createDataFrame([(3, 2, 0)], daily.schema), ignore_nullable=True)

    backfill.run(spark, settings, DAY, DAY, progress=False)
    clicks = read_table(spark, settings, "gold/attributed_clicks").select("click_id", "impression_id", "match_type")
    expected = spark.createDataFrame([("k1", "i-late", "window"), ("k2", None, "none")], clicks.schema)
    assert_df_equality(clicks, expected, ignore_nullable=True, ignore_row_order=True)
    daily = read_table(spark, settings, "gold/campaign_performance_daily").select(
        "impressions", "clicks", "attributed_clicks", F.col("spend").cast("double").alias("spend"))
    assert_df_equality(daily, spark.createDataFrame([(3, 2, 1, 0.007)], daily.schema), ignore_nullable=True)


def test_the_backfill_of_one_day_sees_the_next_day_a_win_or_a_click_depends_on(spark, tmp_path):
    """A bid at 23:59 won by an impression at 00:01, and a click at 23:59 naming an impression
    stamped 00:30 (click before impression): backfilling the first day alone must see both."""
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    pipeline.ensure_silver_tables(spark, settings, pipeline.privacy_from(settings))
    next_day = DAY + dt.timedelta(days=1)
    append_silver(spark, settings, "bid_requests", [
        {"auction_id": "a1", "event_time": at(23, 59), "event_hour": 23, "has_bid": True, "bid_campaign_id": "c1"}])
    append_silver(spark, settings, "impressions", [
        {"impression_id": "i-won", "event_time": dt.datetime(2026, 11, 17, 0, 1), "event_date": next_day, "event_hour": 0,
         "user_key": "u1", "auction_id": "a1", "cost": Decimal("0.002")},
        {"impression_id": "i-after", "event_time": dt.datetime(2026, 11, 17, 0, 30), "event_date": next_day,
         "event_hour": 0, "user_key": "u2", "cost": Decimal("0.002")}])
    append_silver(spark, settings, "clicks", [
        {"event_id": "k-early", "event_time": at(23, 59), "event_hour": 23, "user_key": "u2", "impression_id": "i-after"}])

    backfill.run(spark, settings, DAY, DAY, progress=False)
    daily = read_table(spark, settings, "gold/campaign_performance_daily").select(
        "event_date", "bids", "wins", "clicks", "ivt_clicks")
    assert_df_equality(daily, spark.createDataFrame([(DAY, 1, 1, 0, 1)], daily.schema), ignore_nullable=True)
