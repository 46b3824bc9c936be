"""Auto compaction: the tables the streams read back every micro-batch compact themselves."""
from __future__ import annotations

import datetime as dt

import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable

from advertisex import correlation, lake, maintenance, pipeline
from advertisex.config import load_conf
from conftest import ROOT, read_table, settings_for

MIN_FILES = 4


def candidate(spark, n: int):
    return spark.createDataFrame(
        [("click_by_id", f"c-{n}", dt.date(2026, 11, 18), "cmp-0001", f"i-{n}", dt.datetime(2026, 11, 18, 10, n), None)],
        correlation.CANDIDATE_SCHEMA)


def files_of(spark, path: str) -> int:
    return DeltaTable.forPath(spark, path).detail().first()["numFiles"]


def property_of(spark, path: str) -> str | None:
    return (DeltaTable.forPath(spark, path).detail().first()["properties"] or {}).get(maintenance.AUTO_COMPACT)


@pytest.fixture
def few_files_are_many(spark):
    """Compaction after MIN_FILES small files in a partition instead of Delta's 50."""
    spark.conf.set("spark.databricks.delta.autoCompact.minNumFiles", str(MIN_FILES))
    yield
    spark.conf.unset("spark.databricks.delta.autoCompact.minNumFiles")


def settings_with(tmp_path, auto_compact: bool):
    return load_conf(f"{ROOT}/conf/test.yaml", {"landing": str(tmp_path / "landing"), "lake": str(tmp_path / "lake"),
                                                "maintenance": {"auto_compact": auto_compact}})


def test_small_appends_are_compacted_after_the_commit_that_gathers_enough(spark, tmp_path, few_files_are_many):
    settings = settings_with(tmp_path, True)
    pipeline.prepare_tables(spark, settings)
    assert {t: property_of(spark, settings.table(t)) for t in maintenance.STREAM_READ_TABLES} == {
        t: "true" for t in maintenance.STREAM_READ_TABLES}

    path = settings.table(correlation.CANDIDATES_TABLE)
    counts = []
    for n in range(MIN_FILES):
        lake.append_once(candidate(spark, n), path, "test", n, ["event_date"])
        counts.append(files_of(spark, path))
    assert counts == [1, 2, 3, 1]  # the fourth commit left four small files in the date: one after compaction
    history = DeltaTable.forPath(spark, path).history(1).first()
    assert history["operation"] == "OPTIMIZE" and history["operationParameters"]["auto"] == "true"
    expected = candidate(spark, 0)
    for n in range(1, MIN_FILES):
        expected = expected.unionByName(candidate(spark, n))
    assert_df_equality(read_table(spark, settings, correlation.CANDIDATES_TABLE), expected, ignore_row_order=True)
    # The batch marks survive the rewrite: a replayed batch is still found and not appended twice.
    lake._appended.clear()
    assert lake.append_once(candidate(spark, 3), path, "test", 3, ["event_date"]) is False


def test_the_conf_turns_it_off_again(spark, tmp_path, few_files_are_many):
    pipeline.prepare_tables(spark, settings_with(tmp_path, True))
    off = settings_with(tmp_path, False)
    maintenance.set_auto_compaction(spark, off)
    assert {t: property_of(spark, off.table(t)) for t in maintenance.STREAM_READ_TABLES} == {
        t: "false" for t in maintenance.STREAM_READ_TABLES}
    path = off.table(correlation.CANDIDATES_TABLE)
    for n in range(MIN_FILES + 1):
        lake.append_once(candidate(spark, n), path, "test", n, ["event_date"])
    assert files_of(spark, path) == MIN_FILES + 1


def test_off_by_default_sets_nothing(spark, tmp_path):
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    pipeline.prepare_tables(spark, settings)
    assert {t: property_of(spark, settings.table(t)) for t in maintenance.STREAM_READ_TABLES} == {
        t: None for t in maintenance.STREAM_READ_TABLES}


def test_a_feed_table_from_an_older_release_is_told_which_statistics_to_keep(spark, tmp_path):
    settings = settings_with(tmp_path, False)
    old = settings.table("bronze/impressions")
    spark.createDataFrame([("{}", "f", dt.datetime(2026, 11, 18), dt.date(2026, 11, 18))],
                          "raw string, source string, ingested_at timestamp, ingest_date date"
                          ).write.format("delta").partitionBy("ingest_date").save(old)
    pipeline.prepare_tables(spark, settings)
    pipeline.prepare_tables(spark, settings)  # a second start finds nothing to change
    wanted = {table: {"delta.dataSkippingStatsColumns": ",".join(columns)}
              for table, columns in [("bronze/impressions", ["source", "ingested_at"])]
              + [(f"silver/{name}", ["event_time", "event_hour", "ingest_batch"])
                 for name in ("impressions", "clicks", "conversions", "bid_requests")]}
    assert {table: stats_property(spark, settings.table(table)) for table in wanted} == wanted
    operations = [h["operation"] for h in DeltaTable.forPath(spark, old).history().orderBy("version").collect()]
    assert operations == ["WRITE", "SET TBLPROPERTIES"]


def stats_property(spark, path: str) -> dict:
    properties = DeltaTable.forPath(spark, path).detail().first()["properties"] or {}
    return {k: v for k, v in properties.items() if k == "delta.dataSkippingStatsColumns"}
