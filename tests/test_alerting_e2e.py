"""Alerting end to end with real parts: the pipeline (its own process, continuous file-drop mode),
the real Prometheus (Debian's package) scraping its endpoint and evaluating the shipped rules,
and a local webhook receiver standing in for Slack and Alertmanager.

Generated events arrive as a live feed: one file per feed every ``WAVE_SECONDS``. The first
phase is the generator's normal data and must raise nothing anywhere; it lasts until every query
is past ``min_history`` micro-batches. Then four faults go in
at once: a burst of malformed impressions, the bid-request feed stopping, a click flood on one
campaign and clicks naming impressions that do not exist. Each must show up in ``ops/alerts``,
on both webhooks and as a firing alert in Prometheus's own API within 60 s or 2 micro-batches of
the query that sees it, whichever is later (a stopped feed: within 60 s of passing its silence
limit). On this 2-core machine a micro-batch of the four concurrent queries takes 20-90 s (gold's
the longest: it rebuilds 11-23 hours a batch, as event time here runs 200 times faster than the
clock), so "2 micro-batches" is the bound that matters for the checks that need gold.
"""
from __future__ import annotations

import csv
import datetime as dt
import glob
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml

from advertisex.generator import Generator, GeneratorOptions
from conftest import ROOT, _free_port_block, read_table, settings_for
from test_crash import PipelineProcess, wait_until

WAVE_SECONDS = 2.0
CLEAN_SECONDS = 150          # normal data before the faults: past the rules' 2 m windows ...
CLEAN_MAX_SECONDS = 400      # ... and on until every query is past min_history batches (gold batches took
                             # 54-92 s here on 2026-11-27: the 4th ended 285 s in); the feed lasts 432 s
DETECTION_SECONDS = 60
GRACE_SECONDS = 15           # after a batch commits: the monitor's check interval, Prometheus's scrape and evaluation
MAX_SILENCE = 60             # monitoring.detectors.max_silence_seconds of this run (batches end every 20-45 s here)
WATCH_MAX_SECONDS = 600      # after the faults: the longest the test waits for its alerts
MIN_HISTORY = 3              # monitoring.detectors.min_history of this run: 5 gold batches would take 4 minutes
FLOOD_CAMPAIGN, GHOST_CAMPAIGN = "cmp-0003", "cmp-0005"
FEED_FILES = {"impressions": "*.jsonl*", "clicks_conversions": "*.csv*", "bid_requests": "part-*.avro"}


class Receiver:
    """A Slack- and Alertmanager-compatible webhook endpoint that records every POST."""

    def __init__(self):
        self.received: list[tuple[str, object, float]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.received.append((self.path, body, time.time()))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def slack_texts(self) -> list[tuple[str, float]]:
        return [(body["text"], at) for path, body, at in self.received if path == "/slack"]

    def alertmanager_alerts(self) -> list[tuple[dict, float]]:
        return [(alert, at) for path, body, at in self.received if path == "/alertmanager" for alert in body]


class Prometheus:
    """The real server, scraping the pipeline every second and evaluating conf/prometheus/alerts.yml."""

    def __init__(self, directory: str, target_port: int):
        self.port = _free_port_block(1)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [os.path.join(ROOT, "conf", "prometheus", "alerts.yml")],
            "scrape_configs": [{"job_name": "advx", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        path = os.path.join(directory, "prometheus.yml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh)
        self.log = open(os.path.join(directory, "prometheus.log"), "w", encoding="utf-8")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={directory}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self.ready, 60, "Prometheus to be ready")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def firing(self) -> list[dict]:
        """Labels of the firing alerts, with ``activeAt`` (Unix seconds) under the key "_since"."""
        return [{**a["labels"], "_since": _ts(a["activeAt"]).timestamp()}
                for a in self.get("/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


class LiveFeed:
    """Drops the generated files one slot per wave, feed by feed, as a live source would."""

    def __init__(self, staging: str, landing: str):
        self.landing = landing
        self.slots = {feed: sorted(glob.glob(os.path.join(staging, feed, pattern)))
                      for feed, pattern in FEED_FILES.items()}
        self.stopped: set[str] = set()
        self.wave = 0
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def drop(self, feed: str, name: str, data: bytes) -> None:
        folder = os.path.join(self.landing, feed)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(folder, name))

    def _loop(self) -> None:
        while self.running.is_set():
            for feed, files in self.slots.items():
                if feed not in self.stopped and self.wave < len(files):
                    with open(files[self.wave], "rb") as fh:
                        self.drop(feed, os.path.basename(files[self.wave]), fh.read())
            self.wave += 1
            time.sleep(WAVE_SECONDS)

    def start(self) -> None:
        self.running.set()
        self.thread.start()

    def stop(self) -> None:
        self.running.clear()
        self.thread.join()

    def recent_impressions(self, waves: int) -> list[dict]:
        """The impressions of the last ``waves`` slots dropped (to click on)."""
        found = []
        for path in self.slots["impressions"][max(0, self.wave - waves):self.wave]:
            with open(path, "rb") as fh:
                data = fh.read()
            text = (gzip.decompress(data) if path.endswith(".gz") else data).decode()
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    found.append({**record, "time": _ts(record["timestamp"])})
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass  # the generator's deliberately bad records
        return found


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["event_id", "timestamp", "event_type", "user_id", "campaign_id", "creative_id",
                     "impression_id", "conversion_type", "conversion_value", "currency"])
    writer.writerows(rows)
    return out.getvalue().encode()


def _ts(iso: str | int) -> dt.datetime:
    if isinstance(iso, int):
        return dt.datetime.fromtimestamp(iso / 1000, dt.timezone.utc)
    parsed = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def inject_faults(feed: LiveFeed, creatives: dict[str, str]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    recent = [i for i in feed.recent_impressions(25) if i.get("creative_id") in creatives and i.get("user_id")
              and now - dt.timedelta(days=2) < i["time"] < now]  # not the generator's invalid timestamps
    newest = max(i["time"] for i in recent)
    # 1. A burst of malformed impressions (truncated JSON), well above the 5 % quarantine limit.
    broken = "\n".join(f'{{"impression_id": "broken-{n}", "timestamp": "{newest.isoformat()}", "cre'
                       for n in range(4000))
    feed.drop("impressions", "fault-malformed.jsonl", broken.encode())
    # 2. The bid-request feed stops.
    feed.stopped.add("bid_requests")
    # 3. A click flood on one campaign: one click on each of its recent impressions, seconds after it.
    flood = [i for i in recent if creatives[i["creative_id"]] == FLOOD_CAMPAIGN][:600]
    rows = [[f"flood-{n}", (i["time"] + dt.timedelta(seconds=5)).strftime("%Y-%m-%d %H:%M:%S"), "click",
             i["user_id"], FLOOD_CAMPAIGN, i["creative_id"], i["impression_id"], "", "", ""]
            for n, i in enumerate(flood)]
    # 4. Clicks naming impressions that never existed, from users never seen.
    ghost_creative = next(c for c, campaign in creatives.items() if campaign == GHOST_CAMPAIGN)
    rows += [[f"ghost-{n}", (newest - dt.timedelta(seconds=n % 300)).strftime("%Y-%m-%d %H:%M:%S"), "click",
              f"u-ghost-{n}", GHOST_CAMPAIGN, ghost_creative, f"imp-ghost-{n}", "", "", ""] for n in range(1000)]
    feed.drop("clicks_conversions", "fault-clicks.csv", _csv(rows))


def deadlines(spark, settings, injected: float) -> dict[str, float]:
    """By when each fault must have been seen: 60 s after it went in, or GRACE_SECONDS after the
    2nd micro-batch of the query that sees it, whichever is later."""
    batches = [(r["feed"], r["batch_started_at"].timestamp(), r["batch_started_at"].timestamp() + r["duration_ms"] / 1000,
                r["rows_in"], (r["quarantine_by_rule"] or {}).get("malformed_record", 0))
               for r in read_table(spark, settings, "ops/metrics").collect()]

    def second_batch_end(feed: str, after: float) -> float:
        ends = sorted(end for f, start, end, _, _ in batches if f == feed and end > after)
        return ends[1] if len(ends) > 1 else float("inf")

    # The faulty files are in the first or second batch of their feed after they were dropped.
    impressions_seen = second_batch_end("impressions", injected)
    clicks_seen = second_batch_end("clicks_conversions", injected)
    floor = injected + DETECTION_SECONDS
    return {
        "malformed burst": max(floor, impressions_seen + GRACE_SECONDS),
        "stopped feed": injected + MAX_SILENCE + DETECTION_SECONDS,
        "click flood": max(floor, clicks_seen + GRACE_SECONDS),
        # seen by gold once the clicks are in silver
        "unknown impressions": max(floor, second_batch_end("gold", clicks_seen) + GRACE_SECONDS),
    }


def alert_rows(spark, settings) -> list[dict]:
    try:
        return [r.asDict() for r in read_table(spark, settings, "ops/alerts").collect()]
    except Exception:  # noqa: BLE001 - the table appears once the pipeline has started
        return []


# What each fault must raise: (pipeline detector rules, Prometheus alert and its labels).
EXPECTED = {
    "malformed burst": ({"quarantine_ratio:malformed_record"},
                        ("AdvxQuarantineRatioHigh", {"feed": "impressions", "rule": "malformed_record"})),
    "stopped feed": ({"feed_stale"}, ("AdvxFeedStale", {"feed": "bid_requests"})),
    # Prometheus's own CTR rule needs an hour-long baseline of 100 clicks a campaign, which this
    # few-minute run never has; the pipeline's per-campaign volume alert reaches Prometheus instead.
    "click flood": ({"ctr_jump", "volume_spike"},
                    ("AdvxPipelineDetector", {"detector": "volume_spike", "campaign_id": FLOOD_CAMPAIGN})),
    "unknown impressions": ({"clicks_without_impression"}, ("AdvxClicksWithoutImpression", {})),
}


def _matches(fault: str, rule: str, feed: str | None, campaign: str | None) -> bool:
    return {
        "malformed burst": rule == "quarantine_ratio:malformed_record" and feed == "impressions",
        "stopped feed": rule == "feed_stale" and feed == "bid_requests",
        "click flood": rule in ("ctr_jump", "volume_spike") and campaign == FLOOD_CAMPAIGN,
        "unknown impressions": rule == "clicks_without_impression",
    }[fault]


@pytest.fixture(scope="module")
def live_run(spark, tmp_path_factory):
    """Runs the whole scenario once; returns what each channel showed in each phase."""
    base = tmp_path_factory.mktemp("alerting")
    staging, landing, lake = str(base / "staging"), str(base / "landing"), str(base / "lake")
    start = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=24)).replace(microsecond=0, tzinfo=None)
    # 216 slots of 6 min 40 s, one every 2 s: 432 s of live feed, longer than the longest clean phase,
    # at about 280 impressions a slot.
    generator = Generator(GeneratorOptions(impressions=60_000, seed=23, start=start.isoformat(), days=1,
                                           files_per_day=216, corrupt_avro_files=0))
    generator.generate(staging, progress=False)
    creatives = {c[0]: c[1] for c in generator.creatives}
    shutil.copytree(os.path.join(staging, "dims"), os.path.join(landing, "dims"))

    receiver = Receiver()
    metrics_port = _free_port_block(1)
    conf = {
        "landing": landing, "lake": lake,
        "streaming": {"trigger_interval": "5 seconds"},
        # Event time here runs 200 times faster than the clock (a 400-second slot every 2 s): the
        # watermark scales with it, or the join would drop what a real feed delivers on time.
        "correlation": {"watermark": "6 hours"},
        "files": {"max_files_per_trigger": 50},
        "monitoring": {
            "prometheus_port": metrics_port,
            # The generator's events are replayed from the last day: their age is the scenario, not a fault.
            "detectors": {"max_silence_seconds": MAX_SILENCE, "max_event_lag_seconds": 2 * 86400,
                          "min_history": MIN_HISTORY},
            "alerting": {"check_interval_seconds": 2, "webhooks": [
                {"url": f"http://127.0.0.1:{receiver.port}/slack", "format": "slack"},
                {"url": f"http://127.0.0.1:{receiver.port}/alertmanager", "format": "alertmanager"},
            ]},
        },
    }
    with open(os.path.join(ROOT, "conf", "test.yaml"), encoding="utf-8") as fh:
        conf = {**yaml.safe_load(fh), **conf}
    conf_path = str(base / "e2e.yaml")
    with open(conf_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(conf, fh)
    settings = settings_for(landing, lake)

    prometheus = Prometheus(str(base), metrics_port)
    pipeline = PipelineProcess(conf_path, str(base / "pipeline.log"))
    feed = LiveFeed(staging, landing)
    result = {"log": str(base / "pipeline.log"), "lake": lake}
    try:
        def scraped() -> bool:
            targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        wait_until(scraped, 180, "Prometheus to scrape the pipeline", pipeline)
        feed.start()
        clean_from = time.monotonic()
        firing_seen: list[dict] = []
        batches = {"feed": 0, "gold": 0}

        def judged() -> bool:
            """Long enough for every detector to judge: past min_history batches of every query."""
            for kind, condition in (("feed", "feed != 'gold'"), ("gold", "feed = 'gold'")):
                batches[kind] = read_table(spark, settings, "ops/metrics").filter(condition).count()
            return batches["feed"] >= 3 * (MIN_HISTORY + 1) and batches["gold"] >= MIN_HISTORY + 1

        while time.monotonic() - clean_from < CLEAN_SECONDS or (
                time.monotonic() - clean_from < CLEAN_MAX_SECONDS and not judged()):
            assert pipeline.alive(), "the pipeline exited during the clean phase"
            firing_seen += [{k: v for k, v in f.items() if k != "_since"} for f in prometheus.firing()]
            time.sleep(2)
        judged()
        result["clean"] = {"ops_alerts": alert_rows(spark, settings), "webhooks": list(receiver.received),
                           "prometheus": firing_seen, "feed_batches": batches["feed"], "gold_batches": batches["gold"]}

        injected = time.time()
        inject_faults(feed, creatives)
        seen: dict[str, dict[str, float]] = {fault: {} for fault in EXPECTED}
        # Watch until every fault is seen everywhere, or its deadline (which moves with the
        # batches of a slow machine) has passed; WATCH_MAX_SECONDS bounds a run that stalls.
        watch_until, judged_at = injected + WATCH_MAX_SECONDS, 0.0
        while time.time() < watch_until and not all(len(s) == 3 for s in seen.values()):
            assert pipeline.alive(), "the pipeline exited after the faults went in"
            if time.time() - judged_at > 20:
                judged_at = time.time()
                due = deadlines(spark, settings, injected)
                unseen = [due[fault] for fault, s in seen.items() if len(s) < 3]
                watch_until = min(injected + WATCH_MAX_SECONDS, max(unseen, default=0) + GRACE_SECONDS)
            rows = alert_rows(spark, settings)
            firing = prometheus.firing()
            texts, am = receiver.slack_texts(), receiver.alertmanager_alerts()
            # Each channel's own timestamp, not the poll's: a slow poll must not make an alert late.
            for fault, (rules, (alertname, labels)) in EXPECTED.items():
                stored = [r["changed_at"].timestamp() for r in rows
                          if r["status"] == "firing" and _matches(fault, r["rule"], r["feed"], r["campaign_id"])]
                if stored:
                    seen[fault].setdefault("ops/alerts", min(stored))
                posted = [at for a, at in am
                          if _matches(fault, a["labels"]["alertname"], a["labels"].get("feed"), a["labels"].get("campaign"))]
                messaged = [at for t, at in texts if "[FIRING]" in t and any(rule in t for rule in rules)]
                if posted and messaged:
                    seen[fault].setdefault("webhooks", max(min(posted), min(messaged)))
                active = [f["_since"] for f in firing
                          if f["alertname"] == alertname and all(f.get(k) == v for k, v in labels.items())]
                if active:
                    seen[fault].setdefault("prometheus", min(active))
            time.sleep(1)
        result["faults"] = seen
        result["deadlines"] = deadlines(spark, settings, injected)
    finally:
        feed.stop()
        pipeline.kill()
        prometheus.stop()
        receiver.server.shutdown()
    return result


def test_a_clean_run_raises_no_alert(live_run):
    clean = live_run["clean"]
    # The phase was long enough for every detector to judge: past min_history batches everywhere.
    assert clean["feed_batches"] >= 3 * (MIN_HISTORY + 1) and clean["gold_batches"] >= MIN_HISTORY + 1, clean
    assert clean["ops_alerts"] == [], clean["ops_alerts"]
    assert clean["webhooks"] == [], clean["webhooks"]
    assert clean["prometheus"] == [], clean["prometheus"]


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_each_injected_fault_alerts_on_every_channel_in_time(live_run, fault):
    seen = live_run["faults"][fault]
    deadline = live_run["deadlines"][fault]
    assert set(seen) == {"ops/alerts", "webhooks", "prometheus"}, (
        f"{fault}: seen on {sorted(seen)} only; pipeline log {live_run['log']}")
    late = {channel: round(t - deadline) for channel, t in seen.items() if t > deadline}
    assert not late, f"{fault}: seen later than allowed (seconds past the deadline): {late}"


def test_the_health_notebook_plots_the_live_run(spark, live_run, tmp_path, monkeypatch):
    """notebooks/pipeline_health.py on the lake of the run above: its frames hold every batch and alert."""
    import runpy

    monkeypatch.setenv("ADVX_LAKE", live_run["lake"])
    monkeypatch.setenv("ADVX_FIGURES", str(tmp_path))
    notebook = runpy.run_path(os.path.join(ROOT, "notebooks", "pipeline_health.py"))
    settings = settings_for("unused", live_run["lake"])
    feed_batches = read_table(spark, settings, "ops/metrics").filter("feed != 'gold'").count()
    alert_ids = {r["alert_id"] for r in read_table(spark, settings, "ops/alerts").select("alert_id").collect()}
    assert len(notebook["per_batch"]) == feed_batches
    assert set(notebook["alerts"]["alert_id"]) == alert_ids and alert_ids
    assert sorted(os.listdir(tmp_path)) == ["health_alerts.png", "health_feeds.png"]
