"""Exactly once from Kafka into silver and gold while things break: the pipeline killed with SIGKILL,
the broker restarted mid-stream, OPTIMIZE running on silver as the stream writes.

The pipeline runs as its own process (``jobs/pipeline.py``), as in production; the test process
only produces, breaks things, and reads the lake afterwards.
"""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from chispa import assert_df_equality
from pyspark.sql import functions as F

from advertisex import backfill, maintenance
from advertisex.config import load_conf
from advertisex.generator import GeneratorOptions
from conftest import ROOT, TEST_KEY, create_topics, kafka_conf_file, publish, read_table
from test_gold import actual_daily, expected_daily, gold_dates

SILVER_KEYS = {"impressions": "impression_id", "clicks": "event_id", "conversions": "event_id",
               "bid_requests": "auction_id"}


class PipelineProcess:
    """``jobs/pipeline.py`` in its own process group, so a kill takes its JVM down with it."""

    def __init__(self, conf: str, log_path: str, available_now: bool = False):
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "jobs/pipeline.py", "--conf", conf] + (["--available-now"] if available_now else [])
        env = {**os.environ, "ADVX_PSEUDONYMIZATION_KEY": TEST_KEY}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(60)
        self.log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()


def batches_committed(lake: str) -> int:
    """Micro-batches committed so far, any query: each ends with its ops/metrics row (version 0 is
    the empty table a starting pipeline creates)."""
    return max(0, len(glob.glob(os.path.join(lake, "ops", "metrics", "_delta_log", "*.json"))) - 1)


def wait_until(condition, timeout: float, what: str, pipeline: PipelineProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if pipeline is not None and not pipeline.alive():
            raise AssertionError(f"the pipeline exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def exactly_once(spark, settings, expected_ids: dict) -> None:
    """Every produced id once in silver; every counted conversion once in gold; gold clicks between
    the clicks the SPEC counts and all valid clicks (the stream may miss an IVT flag whose impression
    was behind the watermark, never the other way), each once; no Kafka message twice in bronze and
    no micro-batch twice in ops/metrics."""
    rows = []

    def check(name, actual, expected):
        expected_df = spark.createDataFrame([(i,) for i in expected], "id string")
        rows.append((
            name,
            actual.count() - actual.distinct().count(),
            expected_df.subtract(actual).count(),
            actual.subtract(expected_df).count(),
        ))

    for table, key in SILVER_KEYS.items():
        check(f"silver/{table}", read_table(spark, settings, f"silver/{table}").select(F.col(key).alias("id")),
              expected_ids[table])
    check("gold/attributed_conversions",
          read_table(spark, settings, "gold/attributed_conversions").select(F.col("conversion_id").alias("id")),
          expected_ids["conversions"])
    clicks = read_table(spark, settings, "gold/attributed_clicks").select(F.col("click_id").alias("id"))
    counted = spark.createDataFrame([(i,) for i in expected_ids["counted_clicks"]], "id string")
    valid = spark.createDataFrame([(i,) for i in expected_ids["clicks"]], "id string")
    rows.append(("gold/attributed_clicks", clicks.count() - clicks.distinct().count(),
                 counted.subtract(clicks).count(), clicks.subtract(valid).count()))
    # Bronze and ops/metrics are appends: a replayed batch must not add its rows again. A Kafka
    # message is one bronze row (source: topic/partition/offset); a batch is one metrics row.
    for feed in ("impressions", "clicks_conversions", "bid_requests"):
        sources = read_table(spark, settings, f"bronze/{feed}").select("source")
        rows.append((f"bronze/{feed}", sources.count() - sources.distinct().count(), 0, 0))
    batches = read_table(spark, settings, "ops/metrics").select("query_id", "batch_id")
    rows.append(("ops/metrics", batches.count() - batches.distinct().count(), 0, 0))
    actual = spark.createDataFrame(rows, "table string, duplicated long, missing long, unexpected long")
    expected = spark.createDataFrame([(name, 0, 0, 0) for name, *_ in rows], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True)


def _conf(tmp_path, broker, prefix: str, **kafka) -> str:
    path = kafka_conf_file(tmp_path / "conf.yaml", broker, prefix, str(tmp_path / "landing"), str(tmp_path / "lake"),
                           **kafka)
    with open(path, encoding="utf-8") as fh:
        conf = yaml.safe_load(fh)
    conf["streaming"] = {"trigger_interval": "2 seconds"}
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(conf, fh)
    return path


def test_sigkill_three_times_loses_and_doubles_nothing(spark, kafka_broker, tmp_path):
    conf = _conf(tmp_path, kafka_broker, "crash", max_offsets_per_trigger=20000)
    settings = load_conf(conf)
    generator = publish(settings, str(tmp_path / "landing"), GeneratorOptions(impressions=72_000, seed=23, days=2))
    produced = sum(generator.manifest.input_records.values())
    assert produced >= 200_000
    lake, log_path = str(tmp_path / "lake"), str(tmp_path / "pipeline.log")
    rng = random.Random(2026)
    for crash in range(3):
        before = batches_committed(lake)
        run = PipelineProcess(conf, log_path)
        wait_until(lambda b=before: batches_committed(lake) > b, 600, f"a committed micro-batch before crash {crash + 1}", run)
        time.sleep(rng.uniform(0, 8))  # somewhere inside a later batch, its writes or the gold query
        assert run.alive(), "the pipeline stopped before it could be killed"
        run.kill()
    final = PipelineProcess(conf, log_path, available_now=True)
    assert final.wait(1200) == 0, open(log_path, encoding="utf-8").read()[-3000:]
    exactly_once(spark, settings, generator.expected_ids)

    # The stream's gold may miss matches the crashes pushed behind the watermark; the backfill
    # recomputes those dates from silver and must then agree with the ground truth exactly.
    first, last = gold_dates(generator.manifest)
    backfill.run(spark, settings, first, last, progress=False)
    assert_df_equality(actual_daily(spark, settings), expected_daily(spark, generator.manifest),
                       ignore_row_order=True, ignore_nullable=True)


def test_the_pipeline_rides_out_a_broker_restart(spark, kafka_broker, tmp_path):
    conf = _conf(tmp_path, kafka_broker, "restart", max_offsets_per_trigger=5000)
    settings = load_conf(conf)
    lake, landing = str(tmp_path / "lake"), str(tmp_path / "landing")
    create_topics(settings)  # before the pipeline subscribes; the events then arrive at a steady rate
    options = GeneratorOptions(impressions=12_000, seed=31, days=1)
    result = {}
    producer = threading.Thread(target=lambda: result.update(generator=publish(settings, landing, options, rate=1500)))
    producer.start()
    wait_until(lambda: os.path.exists(os.path.join(landing, "dims", "creatives", "creatives.csv")), 120,
               "the creatives file")
    run = PipelineProcess(conf, str(tmp_path / "pipeline.log"))
    try:
        wait_until(lambda: batches_committed(lake) > 8, 600, "the stream to commit from Kafka", run)
        kafka_broker.stop()
        time.sleep(3)
        kafka_broker.start()
        producer.join(600)
        generator = result["generator"]
        expected = len(generator.expected_ids["impressions"]) + len(generator.expected_ids["bid_requests"])
        wait_until(lambda: (read_table(spark, settings, "silver/impressions").count()
                            + read_table(spark, settings, "silver/bid_requests").count()) >= expected,
                   600, "silver to hold every produced event", run)
        counted = len(generator.expected_ids["conversions"])
        wait_until(lambda: read_table(spark, settings, "gold/attributed_conversions").count() >= counted,
                   600, "gold to hold every conversion", run)
        assert run.alive()
    finally:
        if run.alive():
            run.kill()
    exactly_once(spark, settings, generator.expected_ids)


def test_optimize_on_silver_while_the_stream_writes(spark, kafka_broker, tmp_path):
    conf = _conf(tmp_path, kafka_broker, "optimize", max_offsets_per_trigger=3000)
    settings = load_conf(conf)
    generator = publish(settings, str(tmp_path / "landing"), GeneratorOptions(impressions=15_000, seed=37, days=1))
    lake = str(tmp_path / "lake")
    run = PipelineProcess(conf, str(tmp_path / "pipeline.log"))
    compactions = []
    try:
        for round_ in range(3):
            wait_until(lambda r=round_: batches_committed(lake) > 6 * (r + 1), 600, "more committed micro-batches", run)
            for table in ("impressions", "bid_requests"):
                compactions.append(maintenance.optimize(spark, settings.table(f"silver/{table}")))
        expected = len(generator.expected_ids["bid_requests"])
        wait_until(lambda: read_table(spark, settings, "silver/bid_requests").count() >= expected,
                   600, "silver to hold every bid request", run)
        wait_until(lambda: read_table(spark, settings, "gold/attributed_conversions").count()
                   >= len(generator.expected_ids["conversions"]), 600, "gold to hold every conversion", run)
        assert run.alive()
    finally:
        if run.alive():
            run.kill()
    assert sum(c["files_removed"] for c in compactions) > 0  # OPTIMIZE really rewrote files under the stream
    history = spark.sql(f"DESCRIBE HISTORY delta.`{settings.table('silver/bid_requests')}`")
    first_optimize = history.filter("operation = 'OPTIMIZE'").agg(F.min("version")).first()[0]
    assert history.filter(F.col("operation").isin("MERGE", "WRITE") & (F.col("version") > first_optimize)).count() > 0
    exactly_once(spark, settings, generator.expected_ids)


@pytest.fixture(autouse=True)
def _broker_back_up(kafka_broker):
    """A test that failed between stopping and starting the broker must not take the others down."""
    yield
    kafka_broker.start()
