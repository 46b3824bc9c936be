"""append_once: a micro-batch replayed after a crash or a failure is not appended twice; new_rows:
the rows whose id a table does not hold yet."""
from __future__ import annotations

import datetime as dt
import glob
import json
import os

from chispa import assert_df_equality
from delta.tables import DeltaTable

from advertisex import lake

SCHEMA = "app string, batch long"


def batch(spark, app: str, version: int):
    return spark.createDataFrame([(app, version)], SCHEMA)


def append(spark, path: str, app: str, version: int) -> None:
    lake.append_once(batch(spark, app, version), path, app, version)


def table(spark, path: str):
    return spark.read.format("delta").load(path)


def test_a_replayed_batch_is_found_in_history_after_a_restart(spark, tmp_path):
    path = str(tmp_path / "t")
    append(spark, path, "a", 0)
    append(spark, path, "a", 1)
    for version in range(40):  # more commits of another query than the first page of history holds
        append(spark, path, "b", version)
    lake._appended.clear()  # a new process: nothing remembered, so the table's history decides
    append(spark, path, "a", 1)  # the replay of a committed batch
    append(spark, path, "b", 39)
    append(spark, path, "a", 2)  # the next batch goes in
    expected = [("a", 0), ("a", 1), ("a", 2)] + [("b", v) for v in range(40)]
    assert_df_equality(table(spark, path), spark.createDataFrame(expected, SCHEMA), ignore_row_order=True)
    assert lake.last_appended(spark, path, "a") == 2
    assert lake.last_appended(spark, path, "c") is None


def test_a_batch_retried_in_the_same_process_is_not_appended_again(spark, tmp_path):
    path = str(tmp_path / "t")
    for version in range(3):
        append(spark, path, "a", version)
    append(spark, path, "a", 1)  # not above the last batch this process appended: history is read
    append(spark, path, "a", 2)
    assert_df_equality(table(spark, path), spark.createDataFrame([("a", v) for v in range(3)], SCHEMA),
                       ignore_row_order=True)


def test_a_table_written_with_delta_transactions_only_is_still_checked(spark, tmp_path):
    """A lake written before commits were marked: Delta's own record of the app id decides."""
    path = str(tmp_path / "t")
    for version in range(2):
        (batch(spark, "a", version).write.format("delta").mode("append")
         .option("txnAppId", "a").option("txnVersion", str(version)).save(path))
    lake._appended.clear()
    append(spark, path, "a", 1)
    append(spark, path, "a", 2)
    append(spark, path, "a", 3)
    assert_df_equality(table(spark, path), spark.createDataFrame([("a", v) for v in range(4)], SCHEMA),
                       ignore_row_order=True)
    assert lake.last_appended(spark, path, "a") == 3


def test_append_once_says_whether_it_wrote_the_batch_itself(spark, tmp_path):
    """True only when the append went in on its own mark: the caller's observe() then has figures."""
    path = str(tmp_path / "t")
    assert lake.append_once(batch(spark, "a", 0), path, "a", 0) is False  # no marked commit yet: Delta's check decides
    assert lake.append_once(batch(spark, "a", 1), path, "a", 1) is True
    assert lake.append_once(batch(spark, "a", 1), path, "a", 1) is False  # a replay
    assert_df_equality(table(spark, path), spark.createDataFrame([("a", 0), ("a", 1)], SCHEMA), ignore_row_order=True)


def test_new_rows_are_those_whose_id_the_table_does_not_hold(spark, tmp_path):
    path = str(tmp_path / "t")
    rows = "id string, n long"
    spark.createDataFrame([("a", 1), ("b", 1)], rows).write.format("delta").save(path)
    incoming = spark.createDataFrame([("b", 2), ("c", 2), ("d", 2)], rows)
    candidates = spark.createDataFrame([("b",), ("c",), ("d",), ("e",), (None,)], "id string")  # may hold more
    assert_df_equality(lake.new_rows(incoming, path, "id", candidates),
                       spark.createDataFrame([("c", 2), ("d", 2)], rows), ignore_row_order=True)


def test_new_rows_within_event_times_look_only_there(spark, tmp_path):
    """silver.dedup_scope batch_event_times: a re-sent record (its original's event time) is found
    however many batches later; an id reused at a time outside the batch's is not; files of other
    dates, and of other times of the same date, are not read at all (they are deleted here before
    the lookup, which would fail on reading one)."""
    path = str(tmp_path / "t")
    rows = "id string, event_time timestamp, event_date date"

    def at(text):
        return dt.datetime.fromisoformat(text)

    def row(id_, time):
        return (id_, at(time), at(time).date())

    def append(batch):
        spark.createDataFrame(batch, rows).write.format("delta").mode("append").partitionBy("event_date").save(path)

    append([row("a", "2026-11-20 10:00:00"), row("b", "2026-11-20 09:59:59"), row("c", "2026-11-20 12:00:00")])
    before = set(glob.glob(f"{path}/**/*.parquet", recursive=True))
    append([row("d", "2026-11-19 11:00:00")])   # later micro-batches: another date ...
    append([row("f", "2026-11-20 20:00:00")])   # ... and later times of the same date
    append([row("x", "2026-11-21 01:00:00")])
    incoming = spark.createDataFrame(
        [row("a", "2026-11-20 10:00:00"),   # re-sent: the same event time as the row in the table
         row("b", "2026-11-20 10:30:00"),   # b's id reused half an hour after the table's b, outside the batch's times
         row("c", "2026-11-20 12:00:00"),   # re-sent, at the batch's newest time
         row("d", "2026-11-20 11:00:00"),   # d's id reused a day later
         row("e", "2026-11-20 11:00:00")], rows)
    # The whole table (the default) finds b and d too.
    assert_df_equality(lake.new_rows(incoming, path, "id", incoming.select("id")),
                       spark.createDataFrame([row("e", "2026-11-20 11:00:00")], rows), ignore_row_order=True)
    for name in set(glob.glob(f"{path}/**/*.parquet", recursive=True)) - before:
        os.remove(name)
    within = lake.event_times(at("2026-11-20 10:00:00"), at("2026-11-20 12:00:00"))
    expected = [row("b", "2026-11-20 10:30:00"), row("d", "2026-11-20 11:00:00"), row("e", "2026-11-20 11:00:00")]
    assert_df_equality(lake.new_rows(incoming, path, "id", incoming.select("id"), within=within),
                       spark.createDataFrame(expected, rows), ignore_row_order=True)
    # A batch without valid records looks nowhere.
    assert lake.new_rows(incoming, path, "id", incoming.select("id"), within=lake.event_times(None, None)).count() == 5


def test_set_properties_commits_only_what_differs(spark, tmp_path):
    path = str(tmp_path / "t")
    append(spark, path, "a", 0)
    wanted = lake.stats_only(["batch"])
    assert lake.set_properties(spark, path, wanted) is True
    assert lake.set_properties(spark, path, wanted) is False  # nothing differs: no commit
    compaction = "delta.autoOptimize.autoCompact"  # a table that never set it holds Delta's default
    assert lake.set_properties(spark, path, {compaction: "false"}, unset={compaction: "false"}) is False
    history = DeltaTable.forPath(spark, path).history().select("version", "operation").orderBy("version").collect()
    assert [(h["version"], h["operation"]) for h in history] == [(0, "WRITE"), (1, "SET TBLPROPERTIES")]
    assert DeltaTable.forPath(spark, path).detail().first()["properties"] == {"delta.dataSkippingStatsColumns": "batch"}
    assert lake.set_properties(spark, str(tmp_path / "none"), wanted) is False  # no table, nothing created
    assert not os.path.exists(tmp_path / "none")


def test_a_table_append_once_creates_keeps_statistics_of_the_named_columns_only(spark, tmp_path):
    path = str(tmp_path / "t")
    properties = lake.stats_only(["batch"])
    lake.append_once(batch(spark, "a", 0), path, "a", 0, properties=properties)
    lake.append_once(batch(spark, "a", 1), path, "a", 1, properties=lake.stats_only(["app"]))  # ignored: the table exists
    assert DeltaTable.forPath(spark, path).detail().first()["properties"] == properties
    stats = [json.loads(json.loads(line)["add"]["stats"])
             for log in sorted(glob.glob(os.path.join(path, "_delta_log", "*.json")))
             for line in open(log) if '"add"' in line]
    assert stats == [{"numRecords": 1, "minValues": {"batch": v}, "maxValues": {"batch": v}, "nullCount": {"batch": 0}}
                     for v in (0, 1)]
