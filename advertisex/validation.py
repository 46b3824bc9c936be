"""Validation rules declared in conf: rule name -> Spark SQL condition over a parsed record."""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

# Parameters a rule condition may name as if they were columns.
_PARAMS = ("min_event_time", "max_future_skew")


def with_rule_violations(df: DataFrame, rules: dict[str, str], min_event_time: str, max_future_skew: str) -> DataFrame:
    """Add ``reasons``: the names of every rule the record breaks, in conf order (empty when valid)."""
    hits = [F.when(F.coalesce(F.expr(condition), F.lit(False)), F.lit(name)) for name, condition in rules.items()]
    return (
        df.withColumn("min_event_time", F.lit(min_event_time).cast("timestamp"))
        .withColumn("max_future_skew", F.expr(f"INTERVAL {max_future_skew}"))
        .withColumn("reasons", F.filter(F.array(*hits), lambda reason: reason.isNotNull()))
        .drop(*_PARAMS)
    )


def is_valid() -> Column:
    return F.size(F.col("reasons")) == 0


def filter_valid(df: DataFrame) -> DataFrame:
    return df.filter(is_valid())


def filter_invalid(df: DataFrame) -> DataFrame:
    return df.filter(~is_valid())


# File statistics of the quarantine (``lake.stats_only``): not of ``raw`` nor of ``reasons``.
QUARANTINE_STATS_COLUMNS = ["source", "ingested_at"]


def to_quarantine(df: DataFrame, raw: Column | str = "raw") -> DataFrame:
    """The quarantine row of each invalid record: the raw text, its reasons and where it came from."""
    raw = F.col(raw) if isinstance(raw, str) else raw
    return filter_invalid(df).select(
        raw.cast("string").alias("raw"),
        F.col("reasons"),
        F.col("source"),
        F.col("ingested_at"),
    )
