"""Backfill: recompute gold from silver for a range of event dates, one date at a time.

Each date is rebuilt from silver alone (so events that reached silver after the stream's
watermark count too) and written over exactly that date's partitions with ``replaceWhere``.
Running it twice therefore leaves the tables as they were after the first run.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import time
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
    seconds: float


def load_silver(spark: SparkSession, settings: Settings, versions: dict[str, int] | None = None) -> dict[str, DataFrame]:
    """The four silver event tables, whole, as of ``versions`` if given. The first query on a
    frame loaded at a version rebuilds that version's file list from the table's log (about 0.5 s
    a table on a ten-minute live-run lake, docs/BENCHMARKS.md); filters on the same frame reuse
    it, so load once and filter many times."""
    frames = {}
    for name in gold.SILVER_TABLES:
        path = settings.table(f"silver/{name}")
        if not DeltaTable.isDeltaTable(spark, path):
            raise ConfigError(f"no silver table at {path}: run jobs/pipeline.py on this lake first")
        reader = spark.read.format("delta")
        if versions is not None:
            reader = reader.option("versionAsOf", versions[name])
        frames[name] = reader.load(path)
    return frames


def read_silver(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date,
                versions: dict[str, int] | None = None, loaded: dict[str, DataFrame] | None = None
                ) -> dict[str, DataFrame]:
    """The four silver event tables between two event dates (inclusive), as of ``versions`` if
    given, or from frames ``load_silver`` gave."""
    frames = loaded if loaded is not None else load_silver(spark, settings, versions)
    return {name: df.filter(F.col("event_date").between(F.lit(first), F.lit(last))) for name, df in frames.items()}


def silver_versions(spark: SparkSession, settings: Settings) -> dict[str, int]:
    """The current version of each silver event table."""
    return {name: DeltaTable.forPath(spark, settings.table(f"silver/{name}")).history(1).first()["version"]
            for name in gold.SILVER_TABLES}


def write_dates(spark: SparkSession, tables: dict[str, DataFrame], settings: Settings, first: dt.date, last: dt.date,
                retries: int, hours: dict[dt.date, list[int]] | None = None) -> None:
    """Replace the dates' rows (or only the given hours') of every gold table, then the dates' daily
    rows, aggregated from the hourly parts just written (retrying if a concurrent writer won)."""
    def replace(df: DataFrame, name: str) -> None:
        lake.replace_where(
            df, settings.table(f"gold/{name}"), gold.scope_sql(name, first, last, hours), gold.TABLES[name], retries,
            on_retry=lambda n, exc: log.warning(
                "gold/%s %s..%s: concurrent write, retry %d (%s)", name, first, last, n, type(exc).__name__),
        )

    # Each table is its own Delta commit; in a gold batch, stopping the query cancels them too.
    lake.side_by_side([functools.partial(replace, df, name) for name, df in tables.items()])
    parts = (
        spark.read.format("delta").load(settings.table(f"gold/{gold.PARTS_TABLE}"))
        .filter(F.col("event_date").between(F.lit(first), F.lit(last)))
    )
    replace(gold.daily_from_parts(parts), gold.DAILY_TABLE)


def rebuild(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date,
            candidates_of=None, multi_touch: bool = True, silver_versions: dict[str, int] | None = None,
            hours: dict[dt.date, list[int]] | None = None, loaded: dict[str, DataFrame] | None = None) -> None:
    """Recompute and replace gold for the event dates ``first`` to ``last`` (given ``hours``: only
    those hours of them, and the dates' daily rows).

    ``candidates_of(silver, since)`` gives the attribution candidates; by default they are found
    with batch joins over silver (the streaming query passes the ones its joins collected, and
    the silver versions its micro-batch started from, so that gold holds no event whose
    candidates the stream has not looked for yet, and those versions' frames, ``loaded`` once
    for the whole micro-batch).
    """
    windows = Windows.from_conf(settings.conf)
    since = first - dt.timedelta(days=gold.lookback_days(windows))
    if candidates_of:
        silver = read_silver(spark, settings, since, last, silver_versions, loaded)
        found = candidates_of(silver, since)
    else:
        # A bid at 23:59 wins with an impression at 00:01 the next day: the joins look past `last`.
        until = last + dt.timedelta(days=gold.lookahead_days(windows))
        silver = read_silver(spark, settings, since, until)
        found = attribution.all_candidates(silver, windows)
    # Win candidates only for the dates' bid requests: the lookback's are never read.
    in_dates = F.col("event_date").between(F.lit(first), F.lit(last))
    wins = (F.col("kind") == attribution.WIN) & in_dates
    if hours is None:
        cached = found.filter((F.col("kind") != attribution.WIN) | in_dates).persist(StorageLevel.MEMORY_AND_DISK)
        candidates = cached
    else:
        # The streaming path reads its candidates from a table: the win candidates, most of them,
        # are read again where needed (``built`` takes the scope's alone) rather than cached.
        cached = found.filter(F.col("kind") != attribution.WIN).persist(StorageLevel.MEMORY_AND_DISK)
        candidates = cached.unionByName(found.filter(wins))
    try:
        with gold.built(silver, candidates, windows, first, last, multi_touch=multi_touch, hours=hours) as tables:
            write_dates(spark, tables, settings, first, last, settings.conf["gold"]["backfill_retries"], hours)
    finally:
        cached.unpersist()


def dates_between(first: dt.date, last: dt.date) -> list[dt.date]:
    if last < first:
        raise ConfigError(f"--to {last} is before --from {first}")
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def run(spark: SparkSession, settings: Settings, first: dt.date, last: dt.date, progress: bool = True) -> list[DateResult]:
    results = []
    bar = tqdm(dates_between(first, last), desc="backfill", unit="date", disable=not progress)
    for date in bar:
        bar.set_postfix_str(date.isoformat())
        started = time.monotonic()
        rebuild(spark, settings, date, date)
        results.append(DateResult(date, time.monotonic() - started))
        log.info("backfill %s: gold rewritten in %.1f s", date, results[-1].seconds)
    return results
