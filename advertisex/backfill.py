"""Backfill: recompute gold from silver for a range of event dates, one date at a time.

Each date is rebuilt from silver alone (so events that reached silver after the stream's
watermark count too) and written over exactly that date's partitions with ``replaceWhere``.
Running it twice therefore leaves the tables as they were after the first run.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from tqdm import tqdm

from advertisex import attribution, gold, lake
from advertisex.attribution import Windows
from advertisex.config import ConfigError, Settings

log = logging.getLogger("advertisex")


@dataclass
class DateResult:
    date: dt.date
    rows: dict[str, int]
    seconds: float


def read_silver(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date) -> dict[str, DataFrame]:
    """The four silver event tables between two event dates (inclusive)."""
    frames = {}
    for name in gold.SILVER_TABLES:
        path = settings.table(f"silver/{name}")
        if not DeltaTable.isDeltaTable(spark, path):
            raise ConfigError(f"no silver table at {path}: run jobs/pipeline.py on this lake first")
        frames[name] = (
            spark.read.format("delta").load(path)
            .filter(F.col("event_date").between(F.lit(first), F.lit(last)))
        )
    return frames


def write_date(tables: dict[str, DataFrame], settings: Settings, date: dt.date, retries: int) -> None:
    """Replace one date's partitions of every gold table (retrying if a concurrent writer won)."""
    for name, df in tables.items():
        lake.replace_where(
            df, settings.table(f"gold/{name}"), f"event_date = '{date.isoformat()}'", gold.TABLES[name], retries,
            on_retry=lambda n, exc, name=name: log.warning(
                "gold/%s %s: concurrent write, retry %d (%s)", name, date, n, type(exc).__name__),
        )


def dates_between(first: dt.date, last: dt.date) -> list[dt.date]:
    if last < first:
        raise ConfigError(f"--to {last} is before --from {first}")
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def run(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date, progress: bool = True) -> list[DateResult]:
    windows = Windows.from_conf(settings.conf)
    retries = settings.conf["gold"]["backfill_retries"]
    results = []
    bar = tqdm(dates_between(first, last), desc="backfill", unit="date", disable=not progress)
    for date in bar:
        bar.set_postfix_str(date.isoformat())
        started = dt.datetime.now()
        silver = read_silver(spark, settings, date - dt.timedelta(days=gold.lookback_days(windows)), date)
        candidates = attribution.all_candidates(silver, windows).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            tables = gold.build(silver, candidates, windows, date)
            write_date(tables, settings, date, retries)
        finally:
            candidates.unpersist()
        seconds = (dt.datetime.now() - started).total_seconds()
        results.append(DateResult(date, {}, seconds))
        log.info("backfill %s: gold rewritten in %.1f s", date, seconds)
    return results
