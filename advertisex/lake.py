"""Delta writes that are safe to repeat: a micro-batch replayed after a crash changes nothing.

Appends name their micro-batch (app id: the query's id and the table; version: the batch id) in
the commit's ``userMetadata``, and skip a batch the table already holds. They do not use Delta's
own ``txnAppId``/``txnVersion`` options: in this Delta release, checking those makes Delta rebuild
the table's whole state (three Spark jobs) on every append, which cost 0.4 s of a 0.65 s append
(docs/BENCHMARKS.md). The dimension's upsert, a MERGE, takes Delta's pair from the session conf
(``delta_transaction``), set on the micro-batch's own session so concurrent queries do not see it.
"""
from __future__ import annotations

import datetime as dt
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, TypeVar

from delta.exceptions import (
    ConcurrentAppendException,
    ConcurrentDeleteDeleteException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    ConcurrentWriteException,
    DeltaConcurrentModificationException,
    MetadataChangedException,
)
from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.util import inheritable_thread_target

CONFLICTS = (
    ConcurrentAppendException, ConcurrentDeleteDeleteException, ConcurrentDeleteReadException,
    ConcurrentTransactionException, ConcurrentWriteException, DeltaConcurrentModificationException,
    MetadataChangedException,
)
# The Java classes behind them: a conflict raised from a DeltaTable (MERGE, OPTIMIZE) reaches Python
# as a plain Py4JJavaError in this pyspark/delta pair, not converted to the classes above.
_CONFLICT_CLASS_NAMES = {cls.__name__ for cls in CONFLICTS} | {"ProtocolChangedException"}


def is_conflict(exc: BaseException) -> bool:
    """True for a Delta optimistic-concurrency conflict, however it reached Python."""
    if isinstance(exc, CONFLICTS):
        return True
    java = getattr(exc, "java_exception", None)
    name = java.getClass().getName() if java is not None else ""
    return name.startswith("io.delta.exceptions.") and name.rsplit(".", 1)[-1] in _CONFLICT_CLASS_NAMES


log = logging.getLogger("advertisex")
T = TypeVar("T")
_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"


_MARK = "advx-batch"
_HISTORY_PAGE = 32
# (path, app id) -> the newest batch this process appended for it. One query writes an app id, in
# batch order, so a higher batch than that cannot be in the table yet and needs no look at history.
_appended: dict[tuple[str, str], int] = {}


def batch_mark(app_id: str, version: int) -> str:
    """The ``userMetadata`` of an ``append_once`` commit."""
    return f"{_MARK} {version} {app_id}"


def parse_mark(text: str | None) -> tuple[str, int] | None:
    """(app id, version) of a commit's ``userMetadata`` written by ``append_once``; else None."""
    parts = (text or "").split(" ", 2)
    if len(parts) != 3 or parts[0] != _MARK or not parts[1].isdigit():
        return None
    return parts[2], int(parts[1])


def last_appended(spark: SparkSession, path: str, app_id: str) -> int | None:
    """The newest version ``append_once`` committed to ``path`` for ``app_id``; None if the table's
    history holds no commit of it (a new app id, or a table written before commits were marked).

    One app id's commits come from one query, in batch order, so the newest is the one to compare.
    The newest commits are read first, then ever larger pages; a query's own commit is usually
    among the newest few.
    """
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    table = DeltaTable.forPath(spark, path)
    limit = _HISTORY_PAGE
    while True:
        commits = table.history(limit).select("version", "userMetadata").collect()
        for commit in sorted(commits, key=lambda c: c["version"], reverse=True):
            mark = parse_mark(commit["userMetadata"])
            if mark is not None and mark[0] == app_id:
                return mark[1]
        if len(commits) < limit:
            return None
        limit *= 8


def append_once(df: DataFrame, path: str, app_id: str, version: int, partition_by: list[str] | None = None,
                properties: dict[str, str] | None = None) -> bool:
    """Append ``df`` as micro-batch ``version`` of ``app_id``, unless the table holds that batch.
    True when this call wrote ``df`` (an ``observe()`` on it then has its figures); False when the
    batch was in the table already, or when Delta's own transaction check decided (see below),
    which may have skipped the write.

    The table's history is read when this process has not appended the app id's previous batches
    (a query's first batch after a start, which may replay one committed before a crash), or when
    ``version`` is not above the last one it appended (a batch retried after a failure). Without
    a marked commit of the app id (a table written before marks), the append also passes Delta's
    ``txnAppId``/``txnVersion``, so Delta's own record of the app id decides, at its cost.
    ``properties``: table properties for the table this append creates, if it does (``stats_only``).
    """
    key = (path, app_id)
    last = _appended.pop(key, None)  # put back only once this append is known to have committed
    if last is None or last >= version:  # else it is the next batch of a query this process runs
        last = last_appended(df.sparkSession, path, app_id)
    if last is not None and last >= version:
        log.info("%s: batch %d of %s is in the table already; not appended again", path, version, app_id)
        _appended[key] = last
        return False
    writer = df.write.format("delta").mode("append").option("userMetadata", batch_mark(app_id, version))
    writer = writer.options(**(properties or {}))
    if last is None:
        writer = writer.option("txnAppId", app_id).option("txnVersion", str(version))
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(path)
    _appended[key] = version
    return last is not None


def ensure_table(spark: SparkSession, df: DataFrame, path: str, partition_by: list[str] | None = None,
                 properties: dict[str, str] | None = None) -> None:
    """Create an empty Delta table with ``df``'s schema (and ``properties``) if there is none at ``path``."""
    if DeltaTable.isDeltaTable(spark, path):
        return
    writer = df.limit(0).write.format("delta").mode("append").options(**(properties or {}))
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(path)


def ensure_columns(spark: SparkSession, df: DataFrame, path: str) -> None:
    """Create the table, or add the columns of ``df`` it lacks (a lake written by an older release),
    once, before concurrent writers start: schema changes racing each other would conflict."""
    ensure_table(spark, df, path)
    existing = set(spark.read.format("delta").load(path).columns)
    if not set(df.columns) <= existing:
        df.limit(0).write.format("delta").mode("append").option("mergeSchema", "true").save(path)


STATS_COLUMNS = "delta.dataSkippingStatsColumns"


def stats_only(columns: list[str]) -> dict[str, str]:
    """Table properties under which Delta keeps file statistics (min, max, null count) of
    ``columns`` alone, rather than of a table's first 32 columns. A writing task computes them
    row by row, for each column kept; only a column a read filters on can skip files by them. A
    20,000-row silver append used 0.32 s of CPU instead of 0.47 s (docs/BENCHMARKS.md).

    Writer options named ``delta.*`` become the table's properties when the write creates the
    table; a table that exists keeps its own (``set_properties``).
    """
    return {STATS_COLUMNS: ",".join(columns)}


def set_properties(spark: SparkSession, path: str, wanted: dict[str, str], unset: dict[str, str] | None = None) -> bool:
    """Give the table at ``path`` the properties in ``wanted`` that it lacks or holds otherwise, in
    one metadata commit; False, with no commit, when none differ or there is no table. ``unset``:
    the value a property has in a table that never set it (Delta's default), which is then not
    set again."""
    if not DeltaTable.isDeltaTable(spark, path):
        return False
    current = {**(unset or {}), **table_properties(spark, path)}
    changes = {key: value for key, value in wanted.items() if current.get(key) != value}
    if not changes:
        return False
    assignments = ", ".join(f"'{key}' = '{value}'" for key, value in sorted(changes.items()))
    spark.sql(f"ALTER TABLE delta.`{_quoted(path)}` SET TBLPROPERTIES ({assignments})")
    return True


def table_properties(spark: SparkSession, path: str) -> dict[str, str]:
    """The properties of the Delta table at ``path``. Read from the table's metadata alone
    (``SHOW TBLPROPERTIES``): about 0.03 s a table warm, where ``DeltaTable.detail()`` runs a
    Spark job over the table's state and took about 0.5 s (docs/BENCHMARKS.md)."""
    return {row["key"]: row["value"] for row in spark.sql(f"SHOW TBLPROPERTIES delta.`{_quoted(path)}`").collect()}


def _quoted(path: str) -> str:
    return path.replace("`", "``")


@contextmanager
def delta_transaction(spark: SparkSession, app_id: str, version: int):
    spark.conf.set(_TXN_APP_ID, app_id)
    spark.conf.set(_TXN_VERSION, str(version))
    try:
        yield
    finally:
        spark.conf.unset(_TXN_APP_ID)
        spark.conf.unset(_TXN_VERSION)


def new_rows(df: DataFrame, path: str, key: str, candidates: DataFrame, within: Column | None = None) -> DataFrame:
    """The rows of ``df`` whose ``key`` the table at ``path`` does not hold yet. ``candidates``: a
    one-column frame holding at least ``df``'s keys, cheaper to compute than ``df`` itself.

    The candidates are broadcast and the table's key column is scanned against them; the keys
    found there (a batch's duplicates: few) are broadcast back against ``df``. Neither side
    shuffles the table, whose size grows with every batch. A broadcast id costs about 50 bytes
    of the driver's memory: a micro-batch is capped (``max_offsets_per_trigger``,
    ``max_files_per_trigger``) well below what that makes a concern.

    ``within``: a condition on the table's rows; only those are looked in (``event_times``).
    """
    spark = df.sparkSession
    candidates = F.broadcast(candidates.toDF("_candidate").filter(F.col("_candidate").isNotNull()))
    table = spark.read.format("delta").load(path)
    if within is not None:
        table = table.filter(within)
    present = (
        table.select(F.col(key).alias("_present"))
        .join(candidates, on=F.col("_present") == F.col("_candidate"), how="left_semi")
    )
    return df.join(F.broadcast(present), on=F.col(key) == F.col("_present"), how="left_anti")


def event_times(first: dt.datetime | None, last: dt.datetime | None) -> Column:
    """Rows whose ``event_time`` lies from ``first`` to ``last`` (both included; none when either
    is None). The dates also stand alone in the condition, where Delta prunes ``event_date``
    partitions by them; within a date it skips the files whose event times lie outside."""
    if first is None or last is None:
        return F.lit(False)
    low, high = F.lit(first).cast("timestamp"), F.lit(last).cast("timestamp")
    return F.col("event_date").between(F.to_date(low), F.to_date(high)) & F.col("event_time").between(low, high)


def with_conflict_retries(write, retries: int = 5, on_retry=None):
    """``write()``, tried again (after a jittered backoff) while it loses to a concurrent Delta
    commit, at most ``retries`` more times; any other error, or the last conflict, is raised.
    ``on_retry(n, exc)`` hears of the n-th retry before it happens."""
    for attempt in range(retries + 1):
        try:
            return write()
        except Exception as exc:
            if not is_conflict(exc) or attempt == retries:
                raise
            if on_retry is not None:
                on_retry(attempt + 1, exc)
            _backoff(attempt)
    raise AssertionError("unreachable")


def _backoff(attempt: int) -> None:
    time.sleep(min(0.5 * 2 ** attempt, 8.0) * (0.5 + random.random()))


def replace_where(df: DataFrame, path: str, predicate: str, partition_by: list[str], retries: int = 5,
                  on_retry=None) -> None:
    """Replace the rows matching ``predicate`` (on partition columns) with ``df``, atomically.

    Two writers replacing *different* partitions do not conflict: Delta checks the predicate, not
    the table. When they do overlap (a backfill and the stream on the same date), the loser gets
    a concurrent-modification error and simply writes again; its rows are recomputed by the
    caller's ``df`` plan from the table state it reads then.
    """
    with_conflict_retries(
        lambda: (
            df.write.format("delta").mode("overwrite")
            .option("replaceWhere", predicate)
            .option("mergeSchema", "true")  # gold is derived: a new column may join an existing table
            .partitionBy(*partition_by)
            .save(path)
        ),
        retries, on_retry,
    )


def side_by_side(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` at once, each in a thread of its own that takes the caller's Spark job group
    (stopping a streaming query cancels its micro-batch's calls too); their results, in order. A
    Delta commit of a small table is mostly the driver's work (a snapshot, planning, the commit),
    so one call's waits overlap another's work. A failure is raised once every call has ended."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        running = [pool.submit(inheritable_thread_target(call)) for call in calls]
        return [future.result() for future in running]
