"""Table maintenance that runs while the streams write: auto compaction, OPTIMIZE and VACUUM.

OPTIMIZE commits with ``dataChange = false``, so streams reading the table skip it, and a
stream's silver append that read files OPTIMIZE replaced retries (``pipeline``).
OPTIMIZE itself can lose to a concurrent delete or overwrite of the same files; it is retried here.
"""
from __future__ import annotations

import logging

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from advertisex import lake
from advertisex.config import Settings

log = logging.getLogger("advertisex")
AUTO_COMPACT = "delta.autoOptimize.autoCompact"
# The tables a micro-batch reads back: the silver appends look their ids up in the table,
# the gold rebuild reads silver and the candidates by the hour, the detectors read ops/metrics.
# Each micro-batch adds files to each of them, so without compaction every such read opens more
# files as the day goes on. Bronze and quarantine are written, not read, by the streams.
STREAM_READ_TABLES = ("silver/impressions", "silver/clicks", "silver/conversions", "silver/bid_requests",
                      "gold/_candidates", "ops/metrics")


def set_auto_compaction(spark: SparkSession, settings: Settings) -> None:
    """Turn Delta's auto compaction on or off (``maintenance.auto_compact``) for the tables the
    streams read back, with a metadata commit only where the table's setting differs.

    With it on, a commit that leaves at least ``spark.databricks.delta.autoCompact.minNumFiles``
    (Delta's default: 50) small files in a partition it wrote to compacts that partition right
    after, in the writer's thread. The rewrite commits with ``dataChange = false``: streams
    reading the table skip it, and a failed compaction is logged and leaves the commit standing.
    """
    wanted = "true" if settings.conf["maintenance"]["auto_compact"] else "false"
    for table in STREAM_READ_TABLES:
        # A table that never set the property has compaction off: no commit to say so again.
        if lake.set_properties(spark, settings.table(table), {AUTO_COMPACT: wanted}, unset={AUTO_COMPACT: "false"}):
            log.info("%s: auto compaction %s", table, "on" if wanted == "true" else "off")


def optimize(spark: SparkSession, path: str, where: str | None = None, retries: int = 5) -> dict:
    """Compact the small files of ``path`` (optionally only the partitions ``where`` selects)."""
    def compact() -> dict:
        builder = DeltaTable.forPath(spark, path).optimize()
        if where:
            builder = builder.where(where)
        metrics = builder.executeCompaction().select("metrics.numFilesAdded", "metrics.numFilesRemoved").first()
        return {"files_added": int(metrics[0]), "files_removed": int(metrics[1])}

    result = lake.with_conflict_retries(compact, retries, on_retry=lambda n, exc: log.warning(
        "optimize %s: conflicted with a concurrent write (%s); retry %d", path, type(exc).__name__, n))
    log.info("optimize %s: %d files compacted into %d", path, result["files_removed"], result["files_added"])
    return result


def vacuum(spark: SparkSession, path: str, retention_hours: float = 168.0) -> None:
    """Delete files no version within ``retention_hours`` needs (Delta refuses less than 7 days by default)."""
    DeltaTable.forPath(spark, path).vacuum(retention_hours)
