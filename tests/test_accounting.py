"""Generated events, from file drops and from Kafka: every input record lands in exactly one place, as
the generator's manifest says."""
from __future__ import annotations

import csv
import datetime as dt
import glob
import json

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex.generator import Generator, GeneratorOptions
from conftest import GENERATED, read_table, run_pipeline

@pytest.fixture(params=["files", "kafka"])
def lake(request):
    """Each test runs on the generated events from file drops and from a real Kafka broker."""
    return request.getfixturevalue("generated_lake" if request.param == "files" else "kafka_lake")


SILVER_OF = {"impressions": ["impressions"], "clicks_conversions": ["clicks", "conversions"], "bid_requests": ["bid_requests"]}


def test_silver_quarantine_and_duplicates_match_the_manifest(spark, lake):
    settings, manifest = lake
    rows = []
    for feed, tables in SILVER_OF.items():
        silver = sum(read_table(spark, settings, f"silver/{t}").count() for t in tables)
        quarantined = read_table(spark, settings, f"quarantine/{feed}").count()
        bronze = read_table(spark, settings, f"bronze/{feed}").count()
        rows.append((feed, bronze, silver, quarantined))
    actual = spark.createDataFrame(rows, "feed string, input long, silver long, quarantined long")
    expected = spark.createDataFrame([
        (feed, manifest.input_records[feed], sum(manifest.silver[t] for t in tables), manifest.quarantined[feed])
        for feed, tables in SILVER_OF.items()
    ], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True)

    feeds = read_table(spark, settings, "ops/metrics").filter(F.col("feed").isin(*SILVER_OF))
    duplicates = feeds.groupBy("feed").agg(
        F.sum("duplicates_dropped").cast("long").alias("duplicates"),
        F.sum("rows_in").cast("long").alias("rows_in"),
    )
    expected_duplicates = spark.createDataFrame(
        [(feed, manifest.duplicates[feed], manifest.input_records[feed]) for feed in SILVER_OF], duplicates.schema)
    assert_df_equality(duplicates, expected_duplicates, ignore_row_order=True, ignore_nullable=True)


def test_quarantine_reasons_match_the_manifest(spark, lake):
    settings, manifest = lake
    frames = [
        read_table(spark, settings, f"quarantine/{feed}").select(F.lit(feed).alias("feed"), F.explode("reasons").alias("rule"))
        for feed in SILVER_OF
    ]
    actual = frames[0].unionByName(frames[1]).unionByName(frames[2]).groupBy("feed", "rule").count()
    expected = spark.createDataFrame(
        [(feed, rule, n) for feed, rules in manifest.quarantine_by_rule.items() for rule, n in rules.items()],
        actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_observed_quality_counts_match_the_manifest(spark, lake):
    """What observe() counted inside each micro-batch (ops/metrics) adds up to the manifest, per rule."""
    settings, manifest = lake
    metrics = read_table(spark, settings, "ops/metrics").filter(F.col("feed").isin(*SILVER_OF))
    actual = (
        metrics.select("feed", F.explode("quarantine_by_rule").alias("rule", "n"))
        .groupBy("feed", "rule").agg(F.sum("n").cast("long").alias("count"))
    )
    expected = spark.createDataFrame(
        [(feed, rule, n) for feed, rules in manifest.quarantine_by_rule.items() for rule, n in rules.items()],
        actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    # Every record of the JSON feed follows the contract: no schema drift reported.
    assert metrics.filter(F.size("unknown_fields") > 0).count() == 0


def test_ivt_matches_the_manifest(spark, lake):
    settings, manifest = lake
    actual = spark.createDataFrame([
        (table, read_table(spark, settings, f"silver/{table}").filter("is_ivt AND ivt_reason = 'bot_user_agent'").count())
        for table in ("impressions", "bid_requests")
    ], "table string, ivt long")
    expected = spark.createDataFrame([(t, manifest.ivt[t]) for t in ("impressions", "bid_requests")], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True)


def test_no_raw_user_id_or_full_ip_in_silver(spark, lake):
    settings, _ = lake
    world = Generator(GENERATED)  # the same seed rebuilds the same users and IPs
    secrets = spark.createDataFrame(
        [(u,) for u, _, _ in world.users] + [(ip,) for _, ip, _ in world.users] + [("u-bad",)], "secret string")
    for table in ("impressions", "clicks", "conversions", "bid_requests"):
        df = read_table(spark, settings, f"silver/{table}")
        text = F.concat_ws("|", *[F.col(f.name).cast("string") for f in df.schema.fields])
        leaks = df.select(text.alias("row")).join(secrets, F.col("row").contains(F.col("secret")), how="inner")
        assert leaks.count() == 0, f"silver/{table} holds a raw user id or a full IP"


def test_rerun_changes_nothing(spark, lake):
    """A second run over the same drops and checkpoints finds nothing new and writes nothing."""
    settings, _ = lake
    tables = [f"silver/{t}" for t in ("impressions", "clicks", "conversions", "bid_requests")] + ["ops/metrics"]
    before = {t: read_table(spark, settings, t).count() for t in tables}
    run_pipeline(spark, settings)
    after = {t: read_table(spark, settings, t).count() for t in tables}
    assert after == before


def _impression_times(path: str) -> list[dt.datetime]:
    times = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                stamp = json.loads(line)["timestamp"]
            except (ValueError, KeyError, TypeError):
                continue  # the generator's deliberately broken records
            if isinstance(stamp, int):
                times.append(dt.datetime.fromtimestamp(stamp / 1000, dt.timezone.utc))
            elif isinstance(stamp, str) and stamp.startswith("20"):
                times.append(dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")))
    return times


def test_a_span_of_seconds_keeps_event_time_inside_it_and_every_record_accounted(tmp_path):
    """The fixed-rate benchmark's live event time: 90 s in 90 one-second slots, no gzip."""
    start = dt.datetime(2026, 11, 26, 10, 0, 0, tzinfo=dt.timezone.utc)
    options = GeneratorOptions(impressions=4000, seed=5, start="2026-11-26T10:00:00", days=1, files_per_day=90,
                               span_seconds=90, gzip_every=0, corrupt_avro_files=0, ctr=0.2)
    manifest = Generator(options).generate(str(tmp_path), progress=False)
    files = sorted(glob.glob(str(tmp_path / "impressions" / "*.jsonl")))
    assert len(files) == 90
    # The invalid_timestamp records carry 1999 or 2099 on purpose.
    times = [t for f in files for t in _impression_times(f) if t.year == 2026]
    assert times and all(start <= t < start + dt.timedelta(seconds=90) for t in times)
    # Each slot holds the second it names, except the 1 % the generator delivers 2-4 slots late.
    on_time = sum(start + dt.timedelta(seconds=n) <= t < start + dt.timedelta(seconds=n + 1)
                  for n, f in enumerate(files) for t in _impression_times(f))
    assert on_time >= 0.95 * len(times)
    clicks = []
    for path in glob.glob(str(tmp_path / "clicks_conversions" / "*.csv")):
        with open(path, encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if len(r) == 10 and r[3] != "u-bad" and r[0] != "event_id"]
        clicks += [dt.datetime.fromisoformat(r[1].replace("Z", "+00:00")).replace(tzinfo=dt.timezone.utc) for r in rows]
    # Follow-ups after the span are not generated; a click stamped before its impression may precede it.
    assert clicks and all(start - dt.timedelta(seconds=120) <= t < start + dt.timedelta(seconds=90) for t in clicks)
    records = {"impressions": sum(_line_count(f) for f in files),
               "clicks_conversions": sum(_line_count(f) - 1  # the header
                                         for f in glob.glob(str(tmp_path / "clicks_conversions" / "*.csv")))}
    assert records == {feed: manifest.input_records[feed] for feed in records}


def _line_count(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)
