"""SparkSession factory: one place that decides how Spark, Delta and the state store are set up."""
from __future__ import annotations

import glob
import os
import sys

from pyspark.sql import SparkSession

from advertisex.config import Settings

# The exceptions by whose class name in a failed foreachBatch's error text Spark recognises that
# the query's stop interrupted the batch (``StreamExecution.IO_EXCEPTION_NAMES``).
_INTERRUPTIONS = ("java.lang.InterruptedException", "java.io.InterruptedIOException",
                  "java.nio.channels.ClosedByInterruptException")

STATE_STORE_PROVIDERS = {
    "hdfs": "org.apache.spark.sql.execution.streaming.state.HDFSBackedStateStoreProvider",
    "rocksdb": "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
}


def project_jars() -> list[str]:
    """Jars fetched by scripts/setup.sh, for sessions started outside spark-submit (tests, notebooks)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    jar_dir = os.environ.get("ADVX_JARS_DIR", os.path.join(here, ".jars"))
    return sorted(glob.glob(os.path.join(jar_dir, "*.jar")))


def snapshot_tasks(spark_conf: dict) -> int:
    """Tasks Delta rebuilds a table's file list with (its own default, 50, is sized for clusters).

    One in local mode: on one machine a table holds a few thousand files, and each task costs
    more to ship than to run (20k impressions in 16 small batches per feed: 233 s against
    248-260 s with four tasks, docs/BENCHMARKS.md).
    """
    if str(spark_conf["master"] or "").startswith("local"):
        return 1
    return max(2, spark_conf["shuffle_partitions"])


def build_session(settings: Settings, app_name: str | None = None) -> SparkSession:
    """Create (or reuse) the SparkSession for a job, configured for Delta and this environment."""
    spark_conf = settings.conf["spark"]
    # Python workers must run the interpreter that has this project's packages (pyarrow, iptocc...).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name or spark_conf["app_name"])
    if spark_conf["master"]:
        builder = builder.master(spark_conf["master"])
    options = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(spark_conf["shuffle_partitions"]),
        "spark.sql.streaming.stateStore.providerClass": STATE_STORE_PROVIDERS[spark_conf["state_store_provider"]],
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
        "spark.databricks.delta.snapshotPartitions": str(snapshot_tasks(spark_conf)),
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # Exact file statistics for strings up to 64 characters (Delta keeps 32 by default): a
        # micro-batch's tag, ``<query id>:<batch id>``, is longer, and the pipeline finds the rows a
        # batch committed by skipping every file whose tag range does not hold it.
        "spark.databricks.io.skipping.stringPrefixLength": "64",
        # Compiled code for 2,000 classes, not Spark's 100. Ingestion alone compiles about 400
        # distinct classes (stages, projections, orderings) and a gold rebuild 350 more; with 100
        # a micro-batch found few of its own still compiled and compiled them again (20k
        # impressions in 48 small batches: 4,999 compilations taking 31 s, against 385 taking 4.5 s).
        "spark.sql.codegen.cache.maxEntries": "2000",
        # Auto compaction (``maintenance``) rewrites every file under this size in a partition it
        # compacts. At 5,000 events/s, 50 new files of a silver impressions partition hold about
        # 12 MB (docs/BENCHMARKS.md). With Delta's default, 64 MB, the partition's file would be
        # rewritten 6 times before it outgrew the limit (3.5 bytes written per byte); at 16 MB
        # twice (1.5). A day then leaves about 90 files per partition instead of about 9,000.
        "spark.databricks.delta.autoCompact.minFileSize": str(16 * 1024 * 1024),
        "spark.ui.showConsoleProgress": "false",
    }
    log4j = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "log4j2.properties")
    if not os.environ.get("ADVX_SUBMITTED"):  # spark-submit.sh passes its own
        java = [f"-Dlog4j.configurationFile=file:{log4j}"] if os.path.isfile(log4j) else []
        java += [spark_conf["driver_java_options"]] if spark_conf["driver_java_options"] else []
        if java:
            options["spark.driver.extraJavaOptions"] = " ".join(java)
    # Under spark-submit the wrapper already passes --jars; a plain python process needs them here.
    jars = project_jars()
    if jars and not os.environ.get("ADVX_SUBMITTED"):
        options["spark.jars"] = ",".join(jars)
    if spark_conf["driver_memory"]:
        options["spark.driver.memory"] = str(spark_conf["driver_memory"])
    options.update({key: str(value) for key, value in spark_conf["extra"].items()})
    for key, value in options.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(spark_conf["log_level"])
    return spark


class StoppedInBatch(Exception):
    """A micro-batch handler interrupted by its query's stop."""


def quiet_when_stopped(handler):
    """``handler`` (a foreachBatch function) such that a stop that interrupts it ends the query
    as a stop, not with a StackOverflowError.

    Stopping a query interrupts the Spark job its handler is running, and the Py4J error that
    reaches Spark holds the whole Java stack trace: tens of kilobytes. Spark tells a stop from a
    failure by matching that text with a regular expression that recurses once per character
    (``StreamExecution.PROXY_ERROR``); on so long a text the stream thread's stack overflows, and
    the thread dies printing the error. The interruption is raised again here as one short line
    that the expression recognises.
    """
    def run(batch_df, batch_id: int) -> None:
        try:
            handler(batch_df, batch_id)
        except Exception as exc:
            interruption = next((name for name in _INTERRUPTIONS if name in str(exc)), None)
            if interruption is None:
                raise
            raise StoppedInBatch("py4j.protocol.Py4JJavaError: An error occurred while calling "
                                 f"the handler of batch {batch_id}: {interruption}") from None

    return run
