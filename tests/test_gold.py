"""Gold from the stream and from the backfill, against the generator's independent ground truth."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import runpy
import shutil
from decimal import Decimal

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex import attribution, backfill, correlation, gold
from conftest import ROOT, read_table, run_correlation

COUNTS = ["impressions", "clicks", "attributed_clicks", "conversions", "attributed_conversions",
          "ivt_impressions", "ivt_clicks", "bids", "wins"]
DAILY = ", ".join(["event_date date, campaign_id string"] + [f"{c} long" for c in COUNTS]
                  + ["spend decimal(18,6)", "conversion_value decimal(18,6)"])


def expected_daily(spark, manifest):
    rows = []
    for key, figures in manifest.gold_daily.items():
        date, campaign = key.split("|")
        rows.append((dt.date.fromisoformat(date), campaign, *[figures[c] for c in COUNTS],
                     Decimal(figures["spend"]), Decimal(figures["conversion_value"])))
    return spark.createDataFrame(rows, DAILY)


def actual_daily(spark, settings, version=None):
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    df = reader.load(settings.table("gold/campaign_performance_daily"))
    return df.select("event_date", "campaign_id", *COUNTS, "spend", "conversion_value")


def funnel_by_date(spark, settings, version):
    return (
        snapshot(spark, settings, "gold/bid_funnel_hourly", version).groupBy("event_date")
        .agg(*[F.sum(c).cast("long").alias(c) for c in ("bid_requests", "bids", "wins")])
    )


def expected_funnel(spark, manifest):
    return spark.createDataFrame(
        [(dt.date.fromisoformat(d), f["bid_requests"], f["bids"], f["wins"]) for d, f in manifest.bid_funnel_daily.items()],
        "event_date date, bid_requests long, bids long, wins long")


def gold_dates(manifest):
    dates = sorted({dt.date.fromisoformat(k.split("|")[0]) for k in manifest.gold_daily})
    return dates[0], dates[-1]


def table_version(spark, settings, name):
    return spark.sql(f"DESCRIBE HISTORY delta.`{settings.table(name)}`").agg(F.max("version")).first()[0]


def snapshot(spark, settings, name, version):
    df = spark.read.format("delta").option("versionAsOf", version).load(settings.table(name))
    return df.drop("unique_users_sketch")


@pytest.fixture(scope="module")
def versions(spark, generated_lake):
    """Table versions of gold as the stream left it, then after one backfill of every date."""
    settings, manifest = generated_lake
    streamed = {name: table_version(spark, settings, f"gold/{name}") for name in gold.STREAMING_TABLES}
    first, last = gold_dates(manifest)
    backfill.run(spark, settings, first, last, progress=False)
    backfilled = {name: table_version(spark, settings, f"gold/{name}") for name in gold.TABLES}
    return streamed, backfilled


def test_streaming_gold_matches_the_manifest(spark, generated_lake, versions):
    settings, manifest = generated_lake
    streamed, _ = versions
    daily = actual_daily(spark, settings, streamed["campaign_performance_daily"])
    assert_df_equality(daily, expected_daily(spark, manifest), ignore_row_order=True, ignore_nullable=True)
    funnel = funnel_by_date(spark, settings, streamed["bid_funnel_hourly"])
    assert_df_equality(funnel, expected_funnel(spark, manifest), ignore_row_order=True, ignore_nullable=True)


def test_daily_ratios_follow_the_spec(spark, generated_lake, versions):
    settings, _ = generated_lake
    daily = read_table(spark, settings, "gold/campaign_performance_daily")
    recomputed = daily.select(
        "event_date", "campaign_id",
        F.when(F.col("impressions") > 0, F.col("clicks") / F.col("impressions")).alias("ctr"),
        F.when(F.col("clicks") > 0, F.col("conversions") / F.col("clicks")).alias("cvr"),
        F.when(F.col("impressions") > 0, F.col("spend") * 1000 / F.col("impressions")).cast("decimal(18,6)").alias("cpm"),
        F.when(F.col("conversions") > 0, F.col("spend") / F.col("conversions")).cast("decimal(18,6)").alias("cpa"),
        F.when(F.col("bids") > 0, F.col("wins") / F.col("bids")).alias("win_rate"),
    )
    assert_df_equality(daily.select(*recomputed.columns), recomputed, ignore_row_order=True, ignore_nullable=True)


def test_hourly_sums_to_daily(spark, generated_lake, versions):
    settings, _ = generated_lake
    hourly = read_table(spark, settings, "gold/campaign_performance_hourly").groupBy("event_date", "campaign_id").agg(
        *[F.sum(c).cast("long").alias(c) for c in ("impressions", "clicks", "conversions", "ivt_impressions", "ivt_clicks")],
        F.sum("spend").cast("decimal(18,6)").alias("spend"))
    daily = (
        read_table(spark, settings, "gold/campaign_performance_daily")
        .filter((F.col("impressions") + F.col("clicks") + F.col("conversions") + F.col("ivt_impressions")
                 + F.col("ivt_clicks")) > 0)  # rows of campaigns that only bid that day
        .select(*hourly.columns)
    )
    assert_df_equality(hourly, daily, ignore_row_order=True, ignore_nullable=True)


def test_backfill_matches_the_manifest_and_the_stream(spark, generated_lake, versions):
    settings, manifest = generated_lake
    streamed, backfilled = versions
    daily = actual_daily(spark, settings, backfilled["campaign_performance_daily"])
    assert_df_equality(daily, expected_daily(spark, manifest), ignore_row_order=True, ignore_nullable=True)
    funnel = funnel_by_date(spark, settings, backfilled["bid_funnel_hourly"])
    assert_df_equality(funnel, expected_funnel(spark, manifest), ignore_row_order=True, ignore_nullable=True)
    # The generated lake's stream saw all of silver in one pass, late rows included, so the stream
    # and the backfill must agree on every streaming table, row for row.
    for name in gold.STREAMING_TABLES:
        assert_df_equality(snapshot(spark, settings, f"gold/{name}", streamed[name]),
                           snapshot(spark, settings, f"gold/{name}", backfilled[name]),
                           ignore_row_order=True, ignore_nullable=True)


def test_multi_touch_credits_sum_to_one_per_conversion_and_model(spark, generated_lake, versions):
    settings, manifest = generated_lake
    credits = snapshot(spark, settings, "gold/attribution_multi_touch", versions[1]["attribution_multi_touch"])
    totals = credits.groupBy("conversion_id").pivot("model", attribution.MODELS).agg(F.round(F.sum("credit"), 9))
    conversions = read_table(spark, settings, "silver/conversions").filter(~F.col("is_ivt")).select(
        F.col("event_id").alias("conversion_id"), *[F.lit(1.0).alias(m) for m in attribution.MODELS])
    assert_df_equality(totals, conversions, ignore_row_order=True, ignore_nullable=True)


def test_backfill_twice_changes_nothing(spark, generated_lake, versions):
    settings, manifest = generated_lake
    _, backfilled = versions
    first, last = gold_dates(manifest)
    backfill.run(spark, settings, first, last, progress=False)
    for name, version in backfilled.items():
        assert_df_equality(snapshot(spark, settings, f"gold/{name}", version),
                           read_table(spark, settings, f"gold/{name}").drop("unique_users_sketch"),
                           ignore_row_order=True, ignore_nullable=True)


def test_campaign_notebook_runs_headless_and_plots_gold(spark, generated_lake, versions, tmp_path, monkeypatch):
    settings, manifest = generated_lake
    monkeypatch.setenv("ADVX_LAKE", settings.lake)
    monkeypatch.setenv("ADVX_FIGURES", str(tmp_path))
    notebook = runpy.run_path(os.path.join(ROOT, "notebooks", "campaign_performance.py"))
    try:
        names = sorted(p.name for p in tmp_path.iterdir() if p.stat().st_size > 10_000)
        assert names == ["attribution_models.png", "bid_funnel.png", "kpis_over_time.png"]
        # What the KPI plot draws is gold's numbers for the top campaigns, date by date.
        kpis = spark.createDataFrame(notebook["kpis"][["event_date", "campaign_id", "impressions", "clicks"]])
        top = set(notebook["top"])
        expected = spark.createDataFrame(
            [(dt.date.fromisoformat(k.split("|")[0]), k.split("|")[1], f["impressions"], f["clicks"])
             for k, f in manifest.gold_daily.items() if k.split("|")[1] in top],
            kpis.schema)
        assert_df_equality(kpis, expected, ignore_row_order=True, ignore_nullable=True)
        models = spark.createDataFrame(notebook["models"]).groupBy("model").agg(F.round(F.sum("credited_conversions"), 6).alias("n"))
        top_conversions = float(sum(f["conversions"] for k, f in manifest.gold_daily.items() if k.split("|")[1] in top))
        expected_models = spark.createDataFrame([(m, top_conversions) for m in attribution.MODELS], models.schema)
        assert_df_equality(models, expected_models, ignore_row_order=True, ignore_nullable=True)
    finally:
        import matplotlib.pyplot as plt
        plt.close("all")


def test_backfill_while_the_stream_writes_the_same_dates(spark, generated_lake, versions):
    """The correlation query (fresh checkpoint: it rebuilds every date) and a backfill of every
    date write the same partitions at once. Conflicts are retried; gold ends exact."""
    settings, manifest = generated_lake
    first, last = gold_dates(manifest)
    query = correlation.start(spark, settings, available_now=False,
                              checkpoint=os.path.join(settings.checkpoints, "gold-concurrent"))
    try:
        backfill.run(spark, settings, first, last, progress=False)
        query.processAllAvailable()
    finally:
        query.stop()
    assert query.exception() is None
    daily = read_table(spark, settings, "gold/campaign_performance_daily").select(*expected_daily(spark, manifest).columns)
    assert_df_equality(daily, expected_daily(spark, manifest), ignore_row_order=True, ignore_nullable=True)
    for name in gold.TABLES:
        assert_df_equality(snapshot(spark, settings, f"gold/{name}", versions[1][name]),
                           read_table(spark, settings, f"gold/{name}").drop("unique_users_sketch"),
                           ignore_row_order=True, ignore_nullable=True)


def test_gold_batches_pin_silver_to_the_versions_their_streams_read():
    def offset(table, version, index=-1):
        return json.dumps({"sourceVersion": 1, "reservoirId": table, "reservoirVersion": version, "index": index,
                           "isStartingVersion": False})
    log = ["v1", json.dumps({"batchWatermarkMs": 0, "batchTimestampMs": 0, "conf": {}}),
           offset("imp", 15), "-", offset("imp", 15), offset("bid", 12), offset("clk", 7, index=3), offset("cnv", 0)]
    ids = {"impressions": "imp", "bid_requests": "bid", "clicks": "clk", "conversions": "cnv"}
    # (V, -1): versions up to V - 1 read; (V, 3): version V only in part, so V - 1; an empty table stays at 0
    assert correlation.versions_read_by(log, ids) == {"impressions": 14, "bid_requests": 11, "clicks": 6,
                                                      "conversions": 0}
    assert correlation.versions_read_by(log[:5], ids) is None  # a table the entry does not name
    # Of clicks, version 7 was read only in part: its events reached the batch, not its gold.
    assert correlation.partly_read(log, ids) == {"clicks": {7}}


def test_gold_rebuilt_hour_by_hour_equals_the_backfill(spark, generated_lake, versions, tmp_path, caplog):
    """The correlation query over a copy of silver in many small batches, which stop inside silver
    versions: each batch replaces only the hours it changes. Its gold must be the backfill's."""
    settings, _ = generated_lake
    conf = copy.deepcopy(settings.conf)
    conf.update(lake=str(tmp_path / "lake"), checkpoints=None)
    conf["correlation"]["max_files_per_trigger"] = 3  # a silver commit holds 2-16 files
    conf["correlation"]["watermark"] = "3 days"  # no join partner arrives too late: the backfill's candidates
    small = dataclasses.replace(settings, conf=conf)
    shutil.copytree(settings.table("silver"), small.table("silver"))
    caplog.set_level(logging.INFO, logger="advertisex")
    run_correlation(spark, small)
    rebuilt = [re.search(r"(\d+) hours of dates (.+) rebuilt", r.getMessage()) for r in caplog.records
               if r.getMessage().startswith("gold batch")]
    assert len(rebuilt) >= 8
    # Some batch replaced only part of its dates' hours.
    assert any(0 < int(m[1]) < 24 * len(m[2].split(", ")) for m in rebuilt if m is not None)
    for name in gold.STREAMING_TABLES:
        assert_df_equality(read_table(spark, small, f"gold/{name}").drop("unique_users_sketch"),
                           snapshot(spark, settings, f"gold/{name}", versions[1][name]),
                           ignore_row_order=True, ignore_nullable=True)
