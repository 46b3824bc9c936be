"""The contract samples come out exactly as shared/contracts/samples/README.md says."""
from __future__ import annotations

import datetime as dt
import glob
import hashlib
import hmac
import json
import os

from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex import pipeline
from conftest import TEST_KEY, read_table


def _key(user_id: str) -> str:
    return hmac.new(TEST_KEY.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def test_impressions(spark, samples_lake):
    actual = read_table(spark, samples_lake, "silver/impressions").select(
        "impression_id", "event_time", "campaign_id", "advertiser_id", "website", "user_key", "ip_truncated",
        "device_type", "is_ivt", "ivt_reason")
    expected = spark.createDataFrame([
        ("imp-000001", dt.datetime(2026, 11, 20, 10, 15, 2, 123000), "cmp-0001", "adv-01", "news-daily.example.com",
         _key("u-8f3a21"), "203.0.113.0", "desktop", False, None),
        ("imp-000002", dt.datetime(2026, 11, 20, 10, 15, 3), "cmp-0002", "adv-01", "recipes.example.org",
         _key("u-19bb07"), "2001:db8:85a3::", "mobile", False, None),
        ("imp-000003", dt.datetime(2026, 11, 20, 10, 15, 5), "cmp-0001", "adv-01", "news-daily.example.com",
         _key("u-0c77d2"), "198.51.100.0", "bot", True, "bot_user_agent"),
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_clicks_and_conversions(spark, samples_lake):
    clicks = read_table(spark, samples_lake, "silver/clicks").select("event_id", "campaign_id", "impression_id", "is_ivt")
    expected_clicks = spark.createDataFrame(
        [("clk-000001", "cmp-0001", "imp-000001", False), ("clk-000002", "cmp-0002", None, False)], clicks.schema)
    assert_df_equality(clicks, expected_clicks, ignore_row_order=True, ignore_nullable=True)

    conversions = read_table(spark, samples_lake, "silver/conversions").select(
        "event_id", "event_time", "conversion_type", F.col("conversion_value").cast("string").alias("value"))
    expected_conversions = spark.createDataFrame([
        ("cnv-000001", dt.datetime(2026, 11, 20, 12, 2, 9, 500000), "purchase", "49.900000"),
        ("cnv-000002", dt.datetime(2026, 11, 20, 12, 30, 0), "signup", None),
    ], conversions.schema)
    assert_df_equality(conversions, expected_conversions, ignore_row_order=True, ignore_nullable=True)


def test_bid_requests(spark, samples_lake):
    actual = read_table(spark, samples_lake, "silver/bid_requests").select(
        "auction_id", "has_bid", "bid_campaign_id", "country", "website")
    expected = spark.createDataFrame([
        ("auc-000001", True, "cmp-0001", "US", "news-daily.example.com"),
        ("auc-000002", True, "cmp-0002", "DE", "recipes.example.org"),
        ("auc-000003", False, None, "FR", "news-daily.example.com"),
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_quarantine(spark, samples_lake):
    frames = [
        read_table(spark, samples_lake, f"quarantine/{feed}").select(
            F.lit(feed).alias("feed"), F.regexp_extract("raw", r"(imp|clk|cnv)-[0-9]+", 0).alias("id"), "reasons")
        for feed in ("impressions", "clicks_conversions")
    ]
    actual = frames[0].unionByName(frames[1])
    expected = spark.createDataFrame([
        ("clicks_conversions", "clk-000003", ["invalid_event_type"]),
        ("clicks_conversions", "clk-000004", ["malformed_record"]),
        ("clicks_conversions", "cnv-000003", ["invalid_conversion_type"]),
        ("impressions", "imp-000004", ["invalid_timestamp"]),
        ("impressions", "imp-000005", ["malformed_record"]),
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_accounting_per_feed(spark, samples_lake):
    metrics = (
        read_table(spark, samples_lake, "ops/metrics").filter("feed != 'gold'").groupBy("feed")
        .agg(*[F.sum(c).alias(c) for c in ("rows_in", "rows_silver", "rows_quarantined", "duplicates_dropped")])
    )
    expected = spark.createDataFrame([
        ("bid_requests", 3, 3, 0, 0),
        ("clicks_conversions", 8, 4, 3, 1),
        ("impressions", 6, 3, 2, 1),
    ], metrics.schema)
    assert_df_equality(metrics, expected, ignore_row_order=True, ignore_nullable=True)


def test_feed_tables_keep_file_statistics_of_the_columns_reads_filter_on(spark, samples_lake):
    """Delta's statistics of each data file name the table's declared columns, not its first 32."""
    kept: dict[str, set[str]] = {}
    for table in pipeline.feed_tables():
        for log in sorted(glob.glob(os.path.join(samples_lake.table(table), "_delta_log", "*.json"))):
            for line in open(log):
                add = json.loads(line).get("add")
                if add and add.get("stats") and json.loads(add["stats"])["numRecords"]:
                    kept.setdefault(table, set()).update(json.loads(add["stats"])["nullCount"])
    silver_columns = {"event_time", "event_hour", "ingest_batch"}
    assert kept == {
        "bronze/impressions": {"source", "ingested_at"},
        "bronze/clicks_conversions": {"source", "ingested_at"},
        "bronze/bid_requests": {"source", "ingested_at"},
        "quarantine/impressions": {"source", "ingested_at"},
        "quarantine/clicks_conversions": {"source", "ingested_at"},  # the bid request samples are all valid
        "silver/impressions": silver_columns,
        "silver/clicks": silver_columns,
        "silver/conversions": silver_columns,
        "silver/bid_requests": silver_columns,
    }
