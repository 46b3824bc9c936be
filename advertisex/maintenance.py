"""Table maintenance that runs while the streams write: OPTIMIZE (compaction) and VACUUM.

OPTIMIZE commits with ``dataChange = false``, so streams reading the table skip it, and a
stream's silver append that read files OPTIMIZE replaced retries (``pipeline``).
OPTIMIZE itself can lose to a concurrent delete or overwrite of the same files; it is retried here.
"""
from __future__ import annotations

import logging

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from advertisex import lake

log = logging.getLogger("advertisex")


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
