"""Unit tests of the pure transformations, on small frames with explicit schemas."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac

from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex import enrichment, parsing, silver
from advertisex.validation import with_rule_violations


def test_normalize_website(spark):
    df = spark.createDataFrame([
        ("https://www.News-Daily.example.com/sports/article-1", "news-daily.example.com"),
        ("recipes.example.org", "recipes.example.org"),
        ("HTTP://user@WWW.shop.example.net:8080/cart?x=1", "shop.example.net"),
        ("  www.blog.example.com  ", "blog.example.com"),
        (None, None),
    ], "website string, expected string")
    actual = df.select(enrichment.normalize_website(F.col("website")).alias("host"), "expected")
    assert_df_equality(actual.select(F.col("host").alias("v")), df.select(F.col("expected").alias("v")), ignore_nullable=True)


def test_truncate_ip(spark):
    df = spark.createDataFrame([
        ("203.0.113.57", "203.0.113.0"),
        ("2001:db8:85a3::8a2e:370:7334", "2001:db8:85a3::"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3::"),
        ("2001:db8::1", "2001:db8::"),
        ("not-an-ip", None),
        (None, None),
    ], "ip string, expected string")
    actual = df.select(enrichment.truncate_ip(F.col("ip")).alias("v"))
    assert_df_equality(actual, df.select(F.col("expected").alias("v")), ignore_nullable=True)


def test_event_time_parsing(spark):
    df = spark.createDataFrame([
        ("2026-11-20T10:15:02.123Z", dt.datetime(2026, 11, 20, 10, 15, 2, 123000)),
        ("2026-11-20T11:15:03+01:00", dt.datetime(2026, 11, 20, 10, 15, 3)),
        ("1795169705000", dt.datetime(2026, 11, 20, 10, 15, 5)),
        ("2026-11-20 12:02:09.500", dt.datetime(2026, 11, 20, 12, 2, 9, 500000)),
        ("not-a-time", None),
    ], "raw string, expected timestamp")
    actual = df.select(parsing.to_event_time(F.col("raw")).alias("v"))
    assert_df_equality(actual, df.select(F.col("expected").alias("v")), ignore_nullable=True)


def test_hmac_matches_rfc2104(spark):
    key = b"k" * 70  # longer than a block, so the key itself is hashed first
    df = spark.createDataFrame([("u-8f3a21",), ("ü-unicode",), (None,)], "user_id string")
    actual = df.select(enrichment.hmac_sha256_hex(key)(F.col("user_id")).alias("v"))
    expected = spark.createDataFrame(
        [(hmac.new(key, u.encode(), hashlib.sha256).hexdigest() if u else None,) for u in ("u-8f3a21", "ü-unicode", None)],
        "v string")
    assert_df_equality(actual, expected, ignore_nullable=True)


def test_rules_list_every_violation(spark):
    raw = spark.createDataFrame([
        ('{"impression_id": "a", "timestamp": "2026-11-20T10:00:00Z", "creative_id": "cr-1", "user_id": "u", "website": "x.com"}',),
        ('{"impression_id": "b", "timestamp": "1999-01-01T00:00:00Z", "creative_id": "cr-1", "user_id": "", "website": "x.com", "cost": -1}',),
        ('{"impression_id": "c", "timestamp": "2026-11-20T10:00:00Z", "creative_id": "cr-9", "user_id": "u", "website": "x.com"}',),
        ('{"impression_id": "d", ',),
        ('{"impression_id": "e", "timestamp": "2026-11-20T10:00:00Z", "creative_id": "cr-1", "user_id": "u", "website": "x.com", "cost": "abc"}',),
    ], "raw string").withColumn("ingested_at", F.lit(dt.datetime(2026, 11, 21)))
    dim = spark.createDataFrame([("cr-1", "cmp-1", "adv-1", "banner", 1, 1)], parsing.ddl_schema("dim_creatives.ddl"))
    from advertisex.config import load_conf

    rules = load_conf(None).conf["validation"]["rules"]["impressions"]
    actual = (
        raw.transform(parsing.parse_impressions).transform(silver.with_creative_dimension, dim)
        .transform(with_rule_violations, rules, "2000-01-01 00:00:00", "5 minutes")
        .select(F.regexp_extract("raw", r'"impression_id": "(\w)"', 1).alias("id"), "reasons")
    )
    expected = spark.createDataFrame([
        ("a", []),
        ("b", ["missing_required_field", "invalid_timestamp", "negative_amount"]),
        ("c", ["unknown_creative"]),
        ("d", ["malformed_record"]),
        ("e", ["malformed_record"]),
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_csv_column_count_and_header(spark):
    raw = spark.createDataFrame([
        ("event_id,timestamp,event_type,user_id,campaign_id,creative_id,impression_id,conversion_type,conversion_value,currency",),
        ("clk-1,2026-11-20 10:15:40,click,u,cmp-1,cr-1,imp-1,,,",),
        ('cnv-1,2026-11-20 10:15:40,conversion,u,"cmp,1",,,purchase,1.5,USD',),
        ("clk-2,2026-11-20 10:15:40,click,u",),
        ("clk-3,2026-11-20 10:15:40,click,u,cmp-1,cr-1,imp-1,,,,extra",),
        ("",),
    ], "raw string")
    actual = (
        raw.transform(parsing.filter_csv_headers)
        .transform(parsing.parse_clicks_conversions, ["purchase"])
        .select(F.split("raw", ",").getItem(0).alias("id"), "_malformed", "campaign_id", "conversion_type_known")
    )
    expected = spark.createDataFrame([
        ("clk-1", False, "cmp-1", False),
        ("cnv-1", False, "cmp,1", True),
        ("clk-2", True, None, False),
        ("clk-3", True, "cmp-1", False),
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_keep_first_per_id(spark):
    df = spark.createDataFrame([
        ("a", "second", (dt.datetime(2026, 1, 1, 0, 1), "f2", 0)),
        ("a", "first", (dt.datetime(2026, 1, 1, 0, 0), "f1", 5)),
        ("b", "only", (dt.datetime(2026, 1, 1, 0, 0), "f1", 1)),
    ], "id string, v string, _order struct<file_time: timestamp, file: string, position: long>")
    actual = df.transform(silver.keep_first_per_id, "id").select("id", "v")
    expected = spark.createDataFrame([("a", "first"), ("b", "only")], "id string, v string")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_user_agent_details():
    assert enrichment.describe_user_agent(
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)")[3] is True
    assert enrichment.describe_user_agent("python-requests/2.32.3")[3] is True
    iphone = ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1")
    assert enrichment.describe_user_agent(iphone) == ("mobile", "Mobile Safari", "iOS", False)


def test_user_details_per_row_match_the_libraries_and_rfc2104(spark):
    """The one UDF that looks up each distinct agent, prefix and user once gives every row what the
    libraries and HMAC give that row alone, NULLs included, in any mix of repeats."""
    import iptocc

    key = b"silver-key"
    bot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    iphone = ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1")
    records = [
        ("u-1", "1.2.3.4", iphone), ("u-2", "1.2.3.77", bot), ("u-1", "81.2.69.160", iphone),
        (None, None, None), ("u-3", "2001:db8:85a3::8a2e:370:7334", "python-requests/2.32.3"),
        ("u-2", "not-an-ip", iphone), ("u-4", "203.0.113.9", None),
    ]
    df = spark.createDataFrame(records, "user_id string, ip string, user_agent string").repartition(1)
    actual = df.transform(enrichment.with_user_details, key)

    def expected_row(user_id, ip, agent):
        truncated = {"1.2.3.4": "1.2.3.0", "1.2.3.77": "1.2.3.0", "81.2.69.160": "81.2.69.0", "203.0.113.9": "203.0.113.0",
                     "2001:db8:85a3::8a2e:370:7334": "2001:db8:85a3::"}.get(ip)
        device, browser, os_name, is_bot = (enrichment.describe_user_agent(agent) if agent
                                            else (None, None, None, False))
        country = iptocc.country_code(truncated) if truncated else None
        user_key = hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest() if user_id else None
        return (user_id, ip, agent, truncated, device, browser, os_name, is_bot, country, user_key)

    expected = spark.createDataFrame(
        [expected_row(*r) for r in records],
        "user_id string, ip string, user_agent string, ip_truncated string, device_type string, browser string, "
        "os string, is_bot boolean, country string, user_key string")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    assert {r.country for r in actual.collect()} >= {"AU", "GB"}  # the lookup found real countries
    # An Arrow batch with no value at all to look up.
    nulls = df.filter(F.col("user_id").isNull()).transform(enrichment.with_user_details, key)
    assert_df_equality(nulls, expected.filter(F.col("user_id").isNull()), ignore_nullable=True)


def test_committed_rows_reads_only_the_batch_files(spark, tmp_path):
    """A batch's rows are found by file statistics on its tag, which is longer than Delta's default
    32-character string statistics: without the session's longer prefix every file would be read."""
    from advertisex.pipeline import committed_rows

    path = str(tmp_path / "silver")
    query_id = "0c6f3c43-3a3e-4d0b-9f5e-3e4c1c1d2b7a"
    for batch in range(3):
        (spark.range(batch * 10, batch * 10 + 10, numPartitions=2)
         .withColumn("ingest_batch", F.lit(f"{query_id}:{batch}"))
         .write.format("delta").mode("append").save(path))
    rows = committed_rows(spark, path, f"{query_id}:1")
    assert sorted(r.id for r in rows.collect()) == list(range(10, 20))
    assert len(rows.inputFiles()) == 2  # of the table's 6
