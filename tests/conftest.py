"""One SparkSession for the whole test session, plus lakes built once and shared by tests."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess

import pytest
import yaml

TEST_KEY = "test-pseudonymization-key"
os.environ["ADVX_PSEUDONYMIZATION_KEY"] = TEST_KEY

from advertisex import correlation, pipeline  # noqa: E402
from advertisex.config import Settings, load_conf  # noqa: E402
from advertisex.generator import Generator, GeneratorOptions, KafkaPublisher, generate  # noqa: E402
from advertisex.session import build_session  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "..", "shared", "contracts", "samples")
if not os.path.isdir(SAMPLES):
    SAMPLES = os.path.join(ROOT, "tests", "data", "samples")


def settings_for(landing: str, lake: str) -> Settings:
    return load_conf(os.path.join(ROOT, "conf", "test.yaml"), {"landing": landing, "lake": lake})


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    settings = settings_for(str(tmp_path_factory.mktemp("landing")), str(tmp_path_factory.mktemp("lake")))
    session = build_session(settings, "advertisex-tests")
    yield session
    session.stop()


def read_table(spark, settings: Settings, table: str):
    return spark.read.format("delta").load(settings.table(table))


def run_pipeline(spark, settings: Settings) -> None:
    pipeline.run(spark, settings, available_now=True)


def run_correlation(spark, settings: Settings):
    """The correlation query over all of silver (availableNow), stopped in any case; the query."""
    query = correlation.start(spark, settings, available_now=True)
    try:
        query.awaitTermination()
    finally:
        query.stop()
    assert query.exception() is None
    return query


def drop_samples(landing) -> None:
    """The contract samples as file drops under ``landing`` (a pathlib.Path)."""
    for feed, name in [("impressions", "impressions.jsonl"), ("clicks_conversions", "clicks_conversions.csv"),
                       ("bid_requests", "bid_requests.avro"), ("dims/creatives", "creatives.csv")]:
        (landing / feed).mkdir(parents=True)
        shutil.copy(os.path.join(SAMPLES, name), landing / feed / name)


@pytest.fixture(scope="session")
def samples_lake(spark, tmp_path_factory) -> Settings:
    """The contract samples, dropped as files and run through the pipeline once."""
    base = tmp_path_factory.mktemp("samples")
    landing = base / "landing"
    drop_samples(landing)
    settings = settings_for(str(landing), str(base / "lake"))
    run_pipeline(spark, settings)
    return settings


GENERATED = GeneratorOptions(impressions=3000, seed=11, days=2, files_per_day=3, ctr=0.05, cvr=0.2)


@pytest.fixture(scope="session")
def generated_lake(spark, tmp_path_factory):
    """Generated drops (with every kind of bad record) run through the pipeline; (settings, manifest)."""
    base = tmp_path_factory.mktemp("generated")
    manifest = generate(str(base / "landing"), GENERATED, progress=False)
    settings = settings_for(str(base / "landing"), str(base / "lake"))
    run_pipeline(spark, settings)
    return settings, manifest


# -- Kafka: a real broker on loopback, started once for the session ------------------------------
def _free_port_block(size: int) -> int:
    """A port P with P..P+size-1 all free on 127.0.0.1 (the broker uses P, P+1 and P+2)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size > 65535:
            continue
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free loopback ports")


class KafkaBroker:
    """scripts/kafka.sh driven from the tests: the same start/stop a user runs."""

    def __init__(self, directory: str):
        self.directory = directory
        self.port = _free_port_block(3)
        self.sasl_password = secrets.token_hex(16)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port + 2}"

    def _run(self, command: str) -> None:
        env = {**os.environ, "ADVX_KAFKA_DIR": self.directory, "ADVX_KAFKA_PORT": str(self.port),
               "ADVX_KAFKA_SASL_PASSWORD": self.sasl_password}
        subprocess.run([os.path.join(ROOT, "scripts", "kafka.sh"), command], env=env, check=True,
                       stdout=subprocess.DEVNULL)

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    broker = KafkaBroker(str(tmp_path_factory.mktemp("kafka")))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def kafka_conf_file(path, broker: KafkaBroker, prefix: str, landing: str, lake: str, sections: dict | None = None,
                    **kafka) -> str:
    """A conf YAML (conf/test.yaml plus Kafka, plus any other ``sections``) for jobs run in this
    process or as subprocesses."""
    with open(os.path.join(ROOT, "conf", "test.yaml"), encoding="utf-8") as fh:
        conf = yaml.safe_load(fh)
    conf.update(source="kafka", landing=landing, lake=lake, **(sections or {}))
    conf["kafka"] = {
        "bootstrap_servers": broker.bootstrap,
        "topics": {feed: f"{prefix}.{feed}" for feed in ("impressions", "clicks_conversions", "bid_requests")},
        **kafka,
    }
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(conf, fh)
    return str(path)


def create_topics(settings: Settings, partitions: int = 3) -> None:
    """The feed topics, made before a pipeline subscribes (Spark's source does not create them)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    kafka = settings.conf["kafka"]
    admin = AdminClient({"bootstrap.servers": kafka["bootstrap_servers"]})
    new = [NewTopic(topic, num_partitions=partitions, replication_factor=1) for topic in kafka["topics"].values()]
    for future in admin.create_topics(new).values():
        future.result(30)


def publish(settings: Settings, out: str, options: GeneratorOptions, rate: float | None = None) -> Generator:
    """Generate ``options``' events and publish them to the settings' topics; the generator keeps the truth."""
    kafka = settings.conf["kafka"]
    publisher = KafkaPublisher({"bootstrap.servers": kafka["bootstrap_servers"]}, kafka["topics"],
                               kafka["schema_registry_ids"][0], rate=rate, progress=False)
    generator = Generator(options)
    generator.generate(out, progress=False, publisher=publisher)
    return generator


@pytest.fixture(scope="session")
def kafka_lake(spark, kafka_broker, tmp_path_factory):
    """The same generated events as ``generated_lake``, from Kafka topics instead of files, in
    micro-batches of at most 4,000 messages per feed. Silver looks ids up only within each
    batch's event times (``silver.dedup_scope``; the file drops keep the default, the whole table),
    so the manifest's duplicates, sent in random later or earlier batches, check that lookup."""
    base = tmp_path_factory.mktemp("kafka_generated")
    conf = kafka_conf_file(base / "conf.yaml", kafka_broker, "gen", str(base / "landing"), str(base / "lake"),
                           sections={"silver": {"dedup_scope": "batch_event_times"}}, max_offsets_per_trigger=4000)
    settings = load_conf(conf)
    generator = publish(settings, str(base / "landing"), GENERATED)
    run_pipeline(spark, settings)
    return settings, generator.manifest
