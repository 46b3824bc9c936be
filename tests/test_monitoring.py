"""The pipeline's metrics as Prometheus sees them: served over HTTP while the queries run."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import threading
import time
import urllib.request

from chispa import assert_df_equality
from prometheus_client.parser import text_string_to_metric_families

from advertisex import monitoring, pipeline
from conftest import _free_port_block, drop_samples, settings_for


def test_the_pipeline_serves_per_query_metrics_while_it_runs(spark, tmp_path):
    landing = tmp_path / "landing"
    drop_samples(landing)
    settings = settings_for(str(landing), str(tmp_path / "lake"))
    settings = dataclasses.replace(settings, conf=copy.deepcopy(settings.conf))
    port = _free_port_block(1)
    settings.conf["monitoring"]["prometheus_port"] = port

    scraped: list[str] = []
    running = threading.Event()
    running.set()

    def scrape() -> None:  # what a Prometheus server would do, every 200 ms
        while running.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    scraped.append(response.read().decode())
            except OSError:
                pass
            time.sleep(0.2)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        result = pipeline.run(spark, settings, available_now=True)
    finally:
        running.clear()
        scraper.join()

    def input_rows(text: str) -> dict[str, float]:
        return {s.labels["query"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "advx_query_input_rows_total"}

    # The samples' README: 6 impressions, 8 clicks/conversions plus the CSV header line the source
    # reads too; the bid-request query reads the names of new files (1) and decodes them per batch.
    final = input_rows(text_from(result["metrics"]))
    feeds = ("advx_bid_requests", "advx_clicks_conversions", "advx_impressions")
    actual = spark.createDataFrame(sorted((q, final.get(q)) for q in feeds), "query string, rows double")
    expected = spark.createDataFrame([("advx_bid_requests", 1.0), ("advx_clicks_conversions", 9.0),
                                      ("advx_impressions", 6.0)], actual.schema)
    assert_df_equality(actual, expected)
    assert final["advx_gold"] > 0
    assert any(input_rows(text).get("advx_impressions") == 6.0 for text in scraped), "never scraped over HTTP"


def text_from(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def exported_names() -> set[str]:
    """Every sample name the pipeline's registry can expose (counters as <name>_total)."""
    from prometheus_client import CollectorRegistry

    from advertisex.monitoring import PipelineMetrics, QueryListener

    registry = CollectorRegistry()
    PipelineMetrics(registry)
    QueryListener(registry)
    return {f"{m.name}_total" if m.type == "counter" else m.name for m in registry.collect()}


def test_the_grafana_dashboard_and_the_alert_rules_only_query_exported_metrics():
    import json
    import os
    import re

    from conftest import ROOT

    names = exported_names()
    with open(os.path.join(ROOT, "conf", "grafana", "pipeline_health.json"), encoding="utf-8") as fh:
        dashboard = json.load(fh)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    with open(os.path.join(ROOT, "conf", "prometheus", "alerts.yml"), encoding="utf-8") as fh:
        rules = fh.read()
    used = set(re.findall(r"\badvx_[a-z_]+", " ".join(exprs) + rules))
    assert used and used <= names, sorted(used - names)
    assert len(dashboard["panels"]) == 12


def test_an_ops_metrics_row_built_in_the_jvm_holds_exactly_the_python_row(spark):
    """The JSON-literal frame must agree with createDataFrame on every type the row carries:
    naive (process-local) and aware timestamps, NULLs, nested maps, quotes and non-ASCII text."""
    account = monitoring.BatchAccount(
        "impressions", 7, 2_644, 34, {"invalid_timestamp": 8, 'odd "rule" é': 1},
        max_event_time=dt.datetime(2026, 11, 17, 3, 4, 5, 123456),
    )
    account.by_campaign = {"silver:impressions": {"cmp-0001": 100, "cmp-ünï": 2}}
    account.silver_by_table = {"impressions": 102}
    account.unknown_fields = {"extra\nfield": 3}
    started = dt.datetime(2026, 11, 26, 9, 2, 9, 96451, tzinfo=dt.timezone.utc)
    rows = [
        monitoring.metrics_row(account, "advx_impressions", "q-1", started, 1_234),
        ("advx_gold", "gold", "q-2", 8, started, 99, 5, None, None, None, None, None, None, None, None, None),
    ]
    for row in rows:
        expected = spark.createDataFrame([row], monitoring.METRICS_SCHEMA)
        assert_df_equality(monitoring.metrics_row_frame(spark, row), expected, ignore_nullable=True)


def test_a_batchs_newest_event_time_is_of_its_valid_records(spark, tmp_path):
    """A quarantined record stamped far in the future must not become the batch's newest event:
    the event-time lag (its alert, its gauge and ops/metrics) would go negative for the whole batch."""
    def line(impression_id: str, timestamp: str) -> str:
        return json.dumps({"impression_id": impression_id, "timestamp": timestamp, "creative_id": "cr-1",
                           "campaign_id": "cmp-0001", "user_id": "u-1", "website": "example.com", "cost": 0.01})

    lines = [line("imp-1", "2026-11-20T10:00:00Z"), line("imp-2", "2026-11-20T11:30:00Z"),
             line("imp-3", "2099-01-01T00:00:00Z"), '{"impression_id": "imp-4", "timest']
    batch = spark.createDataFrame([(text, "drop-1.jsonl", dt.datetime(2026, 11, 20, 12)) for text in lines],
                                  "raw string, source string, file_time timestamp")
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    writer = pipeline.FeedBatchWriter(spark, settings, pipeline.FEEDS["impressions"], "advx_impressions",
                                      pipeline.privacy_from(settings))
    staged, account = writer._staged(batch, 0, dt.datetime(2026, 11, 20, 12, tzinfo=dt.timezone.utc), salvage=False)
    staged.unpersist()
    assert (account.rows_in, account.rows_quarantined, account.quarantine_by_rule) == (
        4, 2, {"invalid_timestamp": 1, "malformed_record": 1})
    assert account.max_event_time == dt.datetime(2026, 11, 20, 11, 30)
    assert account.valid_times == (dt.datetime(2026, 11, 20, 10), dt.datetime(2026, 11, 20, 11, 30))


def progress(batch: int, arrived: float, processed: float):
    """A progress report as Spark hands it to listeners (Spark's own class, from its JSON form)."""
    from pyspark.sql.streaming.listener import StreamingQueryProgress

    return StreamingQueryProgress.fromJson({
        "id": "00000000-0000-0000-0000-000000000001", "runId": "00000000-0000-0000-0000-000000000002",
        "name": "advx_gold", "timestamp": "2026-11-27T03:00:00.000Z", "batchId": batch, "batchDuration": 1000,
        "numInputRows": 100, "inputRowsPerSecond": arrived, "processedRowsPerSecond": processed,
        "stateOperators": [], "sources": [], "sink": {"description": "ForeachBatchSink", "numOutputRows": -1},
    })


def test_the_behind_streak_counts_batches_in_a_row_below_behind_ratio():
    from prometheus_client import CollectorRegistry

    listener = monitoring.QueryListener(CollectorRegistry(), behind_ratio=0.8)
    streaks = []
    # (arrived, processed) rows/s: 80 % of the input is keeping up; a batch with no input is never behind
    for batch, (arrived, processed) in enumerate([(100, 70), (100, 79), (100, 80), (100, 50), (100, 10),
                                                  (100, 20), (0, 0), (100, 50)]):
        listener._record(progress(batch, arrived, processed))
        streaks.append(listener.registry.get_sample_value("advx_query_batches_behind", {"query": "advx_gold"}))
    assert streaks == [1, 2, 0, 1, 2, 3, 0, 1]


def test_a_status_line_gives_the_batch_account_and_the_seconds_of_each_step(monkeypatch):
    clock = iter([10.0, 12.5, 13.0, 16.25])
    monkeypatch.setattr(monitoring.time, "monotonic", lambda: next(clock))
    laps = monitoring.Laps(monitoring.time.monotonic())
    laps.lap("staging")
    laps.lap("writes", {"silver/clicks": 0.3, "bronze": 0.5})
    laps.lap("metrics")
    account = monitoring.BatchAccount(
        "clicks_conversions", 7, rows_in=1_250, rows_quarantined=3,
        quarantine_by_rule={"negative_amount": 1, "malformed_record": 2}, silver_by_table={"clicks": 1_200, "conversions": 40},
    )
    assert laps.seconds == {"staging": 2.5, "writes": 0.5, "metrics": 3.25}
    assert monitoring.status_line(account, 6.25, laps) == (
        "clicks_conversions batch 7: 1,250 in | 1,240 silver | 3 quarantined (malformed_record=2, negative_amount=1)"
        " | 7 duplicates | 6.2 s (200 rows/s) (staging 2.5 s, writes 0.5 s [silver/clicks 0.3 s, bronze 0.5 s], metrics 3.2 s)"
    )
    assert monitoring.status_line(account, 6.25) == (
        "clicks_conversions batch 7: 1,250 in | 1,240 silver | 3 quarantined (malformed_record=2, negative_amount=1)"
        " | 7 duplicates | 6.2 s (200 rows/s)"
    )
