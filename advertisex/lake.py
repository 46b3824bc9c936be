"""Delta writes that are safe to repeat: a micro-batch replayed after a crash changes nothing.

Appends carry Delta's ``txnAppId``/``txnVersion`` (query id, batch id); Delta skips a transaction
whose version it has already committed for that app id. MERGE takes the same pair from the
session conf, set here on the micro-batch's own session so concurrent queries do not see it.
"""
from __future__ import annotations

from contextlib import contextmanager

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession

_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"


def append_once(df: DataFrame, path: str, app_id: str, version: int, partition_by: list[str] | None = None) -> None:
    writer = (
        df.write.format("delta").mode("append")
        .option("txnAppId", app_id).option("txnVersion", str(version))
    )
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(path)


def ensure_table(spark: SparkSession, df: DataFrame, path: str, partition_by: list[str] | None = None) -> None:
    """Create an empty Delta table with ``df``'s schema if there is none at ``path``."""
    if DeltaTable.isDeltaTable(spark, path):
        return
    writer = df.limit(0).write.format("delta").mode("append")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(path)


@contextmanager
def delta_transaction(spark: SparkSession, app_id: str, version: int):
    spark.conf.set(_TXN_APP_ID, app_id)
    spark.conf.set(_TXN_VERSION, str(version))
    try:
        yield
    finally:
        spark.conf.unset(_TXN_APP_ID)
        spark.conf.unset(_TXN_VERSION)


def insert_new_rows(df: DataFrame, path: str, key: str, app_id: str, version: int,
                    partition_by: list[str] | None = None) -> int | None:
    """Insert the rows of ``df`` whose ``key`` is not in the table yet; return how many went in.

    ``df`` must hold each key once. Returns None when Delta skipped the MERGE because this
    (app_id, version) was committed before, i.e. the micro-batch is a replay.
    """
    spark = df.sparkSession
    ensure_table(spark, df, path, partition_by)
    target = DeltaTable.forPath(spark, path).alias("t")
    with delta_transaction(spark, app_id, version):
        result = (
            target.merge(df.alias("s"), f"t.`{key}` = s.`{key}`")
            .whenNotMatchedInsertAll()
            .execute()
        )
        rows = result.collect()  # one row of commit metrics, or none when Delta skipped the replay
    return int(rows[0]["num_inserted_rows"]) if rows else None
