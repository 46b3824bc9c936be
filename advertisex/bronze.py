"""Bronze: the raw record as it arrived, with where it came from and when it was ingested."""
from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

BRONZE_PARTITIONS = ["ingest_date"]
# File statistics (``lake.stats_only``): not of ``raw``, a whole record, by which no read selects.
STATS_COLUMNS = ["source", "ingested_at"]


def with_ingestion(df: DataFrame, ingested_at: dt.datetime) -> DataFrame:
    """Stamp a micro-batch with one ingestion time (a literal, so every write of it agrees)."""
    return df.withColumn("ingested_at", F.lit(ingested_at).cast("timestamp"))


def to_bronze(df: DataFrame) -> DataFrame:
    return df.select(
        F.col("raw"),
        F.col("source"),
        F.col("ingested_at"),
        F.to_date("ingested_at").alias("ingest_date"),
    )
