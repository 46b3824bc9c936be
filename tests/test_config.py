"""A bad conf, argument or missing secret stops a job with one line naming what is wrong."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from advertisex.config import ConfigError, load_conf, pseudonymization_key
from advertisex.pipeline import trigger_interval
from advertisex.session import snapshot_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conf(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("spark:\n  shufle_partitions: 2\n", "unknown conf key 'spark.shufle_partitions'"),
    ("source: ftp\n", "conf key 'source' must be 'files' or 'kafka'"),
    ("spark:\n  shuffle_partitions: 0\n", "conf key 'spark.shuffle_partitions' must be a positive integer"),
    ("streaming:\n  trigger_interval: soon\n", "conf key 'streaming.trigger_interval' must look like"),
    ("streaming:\n  feed_trigger_intervals:\n    clicks: 30 seconds\n",
     "conf key 'streaming.feed_trigger_intervals' must map feeds (impressions, clicks_conversions, bid_requests)"),
    ("streaming:\n  feed_trigger_intervals:\n    bid_requests: often\n",
     "conf key 'streaming.feed_trigger_intervals.bid_requests' must look like"),
    ("validation:\n  rules:\n    impressions:\n      malformed_record: null\n", "must define malformed_record"),
    ("spark: [1\n", "is not valid YAML"),
    ("maintenance:\n  auto_compact: sometimes\n", "conf key 'maintenance.auto_compact' must be true or false"),
    ("silver:\n  dedup_scope: recent\n", "conf key 'silver.dedup_scope' must be 'table' or 'batch_event_times'"),
])
def test_bad_conf_names_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_conf(_conf(tmp_path, text))


def test_a_feed_may_have_its_own_trigger_interval(tmp_path):
    settings = load_conf(_conf(tmp_path, "streaming:\n  trigger_interval: 5 seconds\n"
                                         "  feed_trigger_intervals:\n    clicks_conversions: 1 minute\n"))
    intervals = {feed: trigger_interval(settings, feed) for feed in ("impressions", "clicks_conversions", "bid_requests")}
    assert intervals == {"impressions": "5 seconds", "clicks_conversions": "1 minute", "bid_requests": "5 seconds"}
    assert trigger_interval(settings) == "5 seconds"  # queries that are not a feed's (dimension, gold)


def test_missing_secret(monkeypatch):
    monkeypatch.delenv("ADVX_PSEUDONYMIZATION_KEY", raising=False)
    with pytest.raises(ConfigError, match="ADVX_PSEUDONYMIZATION_KEY is not set"):
        pseudonymization_key(load_conf(None))


@pytest.mark.parametrize("args, message", [
    (["--landing", "/nonexistent/landing", "--lake", "/tmp/x"], "landing directory not found: /nonexistent/landing"),
    (["--lake", "/tmp/x", "--conf-typo"], "unrecognized arguments: --conf-typo"),
])
def test_pipeline_job_one_line_errors(args, message):
    env = dict(os.environ, ADVX_PSEUDONYMIZATION_KEY="k")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "pipeline.py"), "--conf", os.path.join(ROOT, "conf", "test.yaml"), *args],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


def test_rules_merge_by_name(tmp_path):
    conf = load_conf(_conf(tmp_path, "validation:\n  rules:\n    impressions:\n      negative_amount: null\n"
                                     "      big_cost: 'cost > 100'\n")).conf
    rules = conf["validation"]["rules"]["impressions"]
    assert list(rules) == ["malformed_record", "missing_required_field", "invalid_timestamp", "unknown_creative", "big_cost"]


@pytest.mark.parametrize("conf_file, tasks", [
    ("conf/local.yaml", 1),  # one machine: one task rebuilds a Delta snapshot
    ("conf/test.yaml", 1),
    ("conf/cluster.yaml", 64),  # a cluster: as many as its shuffle partitions
])
def test_delta_snapshot_tasks_follow_the_environment(conf_file, tasks):
    assert snapshot_tasks(load_conf(os.path.join(ROOT, conf_file)).conf["spark"]) == tasks


def test_the_driver_jvm_runs_with_the_java_options_of_the_conf(spark):
    """conf/test.yaml asks for the parallel collector, as conf/local.yaml does: the session's JVM
    must run it (its collectors are named PS ...), not the JVM's default G1."""
    assert load_conf(os.path.join(ROOT, "conf/test.yaml")).conf["spark"]["driver_java_options"] == "-XX:+UseParallelGC"
    beans = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getGarbageCollectorMXBeans()
    assert sorted(bean.getName() for bean in beans) == ["PS MarkSweep", "PS Scavenge"]
