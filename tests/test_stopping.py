"""Stopping a query while its micro-batch writes ends it as a stop, not with a StackOverflowError."""
from __future__ import annotations

import threading
import time
import traceback

import pytest

from advertisex.session import StoppedInBatch, quiet_when_stopped

# What a Delta write interrupted by a stop raises in Python: Py4J's text with the Java stack trace.
INTERRUPTED_WRITE = ("py4j.protocol.Py4JJavaError: An error occurred while calling o1.save.\n"
                     + "\tat org.apache.spark.sql.catalyst.trees.TreeNode.transformDown(TreeNode.scala:467)\n" * 2000
                     + "Caused by: java.lang.InterruptedException")


def stop_check(spark):
    """Spark's own test of a failed foreachBatch's error text for "the query's stop interrupted it"."""
    return spark._jvm.org.apache.spark.sql.execution.streaming.runtime.StreamExecution.PROXY_ERROR()


def test_spark_cannot_read_a_long_interruption_but_reads_ours(spark):
    def interrupted(batch_df, batch_id):
        raise RuntimeError(INTERRUPTED_WRITE)

    with pytest.raises(Exception, match="StackOverflowError"):  # the Spark behaviour worked around
        stop_check(spark).findFirstMatchIn(INTERRUPTED_WRITE).isDefined()
    with pytest.raises(StoppedInBatch) as raised:
        quiet_when_stopped(interrupted)(None, 7)
    sent = "".join(traceback.format_exception(raised.value))  # what Py4J hands Spark
    assert len(sent) < 2000
    assert stop_check(spark).findFirstMatchIn(sent).isDefined()


def test_other_failures_pass_unchanged():
    def failing(batch_df, batch_id):
        raise ValueError("a real failure")

    with pytest.raises(ValueError, match="a real failure"):
        quiet_when_stopped(failing)(None, 0)


def test_a_stop_inside_a_batch_write_is_a_stop(spark, tmp_path):
    writing = threading.Event()

    def slow_write(batch_df, batch_id):
        writing.set()
        (batch_df.sparkSession.range(0, 400_000_000).selectExpr("id", "id % 13 AS x")
         .write.format("delta").mode("overwrite").save(str(tmp_path / "t")))

    query = (spark.readStream.format("rate").option("rowsPerSecond", 10).load()
             .writeStream.foreachBatch(quiet_when_stopped(slow_write)).start())
    try:
        assert writing.wait(120), "the first micro-batch did not start"
        time.sleep(3)  # well inside the write
    finally:
        query.stop()
    assert not query.isActive
    # Had Spark not recognised the stop in the handler's error, this would be that error.
    assert query.exception() is None
