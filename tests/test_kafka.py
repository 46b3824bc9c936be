"""Kafka against a real broker: the broker itself, the wire format, gold, data loss and secrets."""
from __future__ import annotations

import base64
import datetime as dt
import glob
import json
import os
import struct
import subprocess
import sys
import time

import yaml
from chispa import assert_df_equality
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka import TopicPartition
from pyspark.sql import functions as F

from advertisex import pipeline, sources
from advertisex.config import load_conf
from advertisex.generator import Generator, GeneratorOptions, WireFormat
from advertisex.validation import to_quarantine
from conftest import ROOT, TEST_KEY, kafka_conf_file, read_table, settings_for
from test_gold import actual_daily, expected_daily, expected_funnel, funnel_by_date, table_version


def _consume(config: dict, topic: str, expected: int, timeout: float = 30.0) -> list[bytes]:
    consumer = Consumer({**config, "group.id": f"check-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    values, deadline = [], time.monotonic() + timeout
    try:
        while len(values) < expected and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            values.append(message.value())
    finally:
        consumer.close()
    return values


def test_the_broker_serves_an_ordinary_client_with_and_without_sasl(kafka_broker):
    plain = {"bootstrap.servers": kafka_broker.bootstrap}
    sasl = {"bootstrap.servers": kafka_broker.sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN", "sasl.username": "advx", "sasl.password": kafka_broker.sasl_password}
    for name, config in (("plain", plain), ("sasl", sasl)):
        producer = Producer(config)
        for n in range(3):
            producer.produce(f"smoke.{name}", key=b"u", value=f"{name}-{n}".encode())
        assert producer.flush(30) == 0
        assert _consume(config, f"smoke.{name}", 3) == [f"{name}-{n}".encode() for n in range(3)]

    errors = []
    wrong = {**sasl, "sasl.password": "not-the-password", "error_cb": errors.append, "log_level": 0}
    assert _consume(wrong, "smoke.sasl", 1, timeout=10) == []
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors


def test_confluent_header_is_checked_before_decoding(spark):
    wire = WireFormat(schema_id=1)
    world = Generator(GeneratorOptions(impressions=10))
    user, ip, agent = world.users[0]
    record = world._bid_request("auc-1", dt.datetime(2026, 11, 16, tzinfo=dt.timezone.utc), user, ip, agent,
                                world.creatives[0], won=True)["avro"]
    body = wire.avro_body(record)
    messages = [
        ("good", wire.frame(body)),
        ("unknown schema id", wire.frame(body, schema_id=2)),
        ("wrong magic byte", b"\x01" + struct.pack(">I", 1) + body),
        ("truncated body", wire.frame(body[: len(body) // 2])),
        ("header only", wire.frame(b"")),
        ("shorter than a header", b"\x00\x00"),
    ]
    frame = spark.createDataFrame(
        [(value, "bids", 0, offset, dt.datetime(2026, 11, 16)) for offset, (_, value) in enumerate(messages)],
        "value binary, topic string, partition int, offset long, timestamp timestamp")
    actual = sources.to_kafka_records(frame, "bid_requests", [1]).select(
        "source", F.col("record.auction_id").alias("auction_id"), "_order.file", "_order.position")
    expected = spark.createDataFrame(
        [(f"bids/0/{n}", "auc-1" if n == 0 else None, "bids/0", n) for n in range(len(messages))],
        "source string, auction_id string, file string, position long")
    assert_df_equality(actual, expected, ignore_nullable=True)


def test_a_bid_requests_quarantine_row_keeps_its_record_as_json_or_its_bytes_in_base64(spark, tmp_path):
    """The staged batch does not cache the decoded record; the quarantine's text of each invalid
    bid request is made before the cache: the record's JSON when it decodes, else the message's
    bytes in base64."""
    wire = WireFormat(schema_id=1)
    world = Generator(GeneratorOptions(impressions=10))
    user, ip, agent = world.users[0]

    def bid_request(auction_id: str, bid_price: float) -> dict:
        record = world._bid_request(auction_id, dt.datetime(2026, 11, 16, tzinfo=dt.timezone.utc), user, ip, agent,
                                    world.creatives[0], won=True)["avro"]
        record["bid"]["bid_price"] = bid_price
        return record

    valid, negative = bid_request("auc-1", 1.25), bid_request("auc-2", -0.5)
    unknown_schema = wire.frame(wire.avro_body(valid), schema_id=2)
    messages = [wire.frame(wire.avro_body(valid)), wire.frame(wire.avro_body(negative)), unknown_schema]
    frame = spark.createDataFrame(
        [(value, "bids", 0, offset, dt.datetime(2026, 11, 16)) for offset, value in enumerate(messages)],
        "value binary, topic string, partition int, offset long, timestamp timestamp")
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    writer = pipeline.FeedBatchWriter(spark, settings, pipeline.FEEDS["bid_requests"], "advx_bid_requests",
                                      pipeline.privacy_from(settings))
    staged, account = writer._staged(sources.to_kafka_records(frame, "bid_requests", [1]), 0,
                                     dt.datetime.now(dt.timezone.utc), salvage=False)
    try:
        assert "record" not in staged.columns
        rows = {r["source"]: (r["raw"], r["reasons"])
                for r in to_quarantine(staged, pipeline.QUARANTINE_TEXT).collect()}
    finally:
        staged.unpersist()
    assert (account.rows_in, account.rows_quarantined) == (3, 2)
    assert set(rows) == {"bids/0/1", "bids/0/2"}
    text, reasons = rows["bids/0/1"]
    assert reasons == ["negative_amount"]
    assert (json.loads(text)["auction_id"], json.loads(text)["bid"]["bid_price"]) == ("auc-2", -0.5)
    text, reasons = rows["bids/0/2"]
    assert reasons == ["malformed_record"]
    assert base64.b64decode(text) == unknown_schema


def test_bronze_keeps_topic_partition_offset_as_the_source(spark, kafka_lake):
    settings, manifest = kafka_lake
    for feed in ("impressions", "clicks_conversions", "bid_requests"):
        topic = settings.conf["kafka"]["topics"][feed]
        bronze = read_table(spark, settings, f"bronze/{feed}")
        parts = F.split("source", "/")
        actual = bronze.agg(
            F.count(F.lit(1)).alias("rows"),
            F.count_distinct("source").alias("sources"),
            F.count_if((parts[0] == topic) & parts[1].rlike("^[0-9]+$") & parts[2].rlike("^[0-9]+$")).alias("well_formed"),
        )
        n = manifest.input_records[feed]
        assert_df_equality(actual, spark.createDataFrame([(n, n, n)], actual.schema), ignore_nullable=True)


def test_every_message_is_keyed_by_its_user_id(spark, kafka_lake):
    """One user's events stay in order in one partition: a message's key is its record's user id
    (none for a record without one, such as a malformed line, an empty user id or a cut-off Avro body)."""
    settings, manifest = kafka_lake
    kafka = settings.conf["kafka"]
    text = F.col("value").cast("string")
    users = {
        "impressions": lambda m: m.withColumn("user", F.nullif(F.get_json_object(text, "$.user_id"), F.lit(""))),
        "clicks_conversions": lambda m: m.withColumn("user", F.nullif(F.split(text, ",")[3], F.lit(""))),
        "bid_requests": lambda m: sources.to_kafka_records(m, "bid_requests", kafka["schema_registry_ids"])
        .join(m.select(F.concat_ws("/", "topic", F.col("partition").cast("string"), F.col("offset").cast("string"))
                       .alias("source"), "key"), "source")
        .withColumn("user", F.col("record.user.user_id")),
    }
    parts = []
    for feed, with_user in users.items():
        messages = (spark.read.format("kafka").option("kafka.bootstrap.servers", kafka["bootstrap_servers"])
                    .option("subscribe", kafka["topics"][feed]).option("startingOffsets", "earliest").load())
        parts.append(with_user(messages).agg(
            F.lit(feed).alias("feed"),
            F.count(F.lit(1)).alias("messages"),
            F.count_if(~F.col("key").cast("string").eqNullSafe(F.col("user"))).alias("other_key"),
        ))
    actual = parts[0].unionByName(parts[1]).unionByName(parts[2])
    expected = spark.createDataFrame([(feed, manifest.input_records[feed], 0) for feed in users], actual.schema)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_gold_from_kafka_matches_the_manifest(spark, kafka_lake):
    settings, manifest = kafka_lake
    version = table_version(spark, settings, "gold/bid_funnel_hourly")
    assert_df_equality(actual_daily(spark, settings), expected_daily(spark, manifest),
                       ignore_row_order=True, ignore_nullable=True)
    assert_df_equality(funnel_by_date(spark, settings, version), expected_funnel(spark, manifest),
                       ignore_row_order=True, ignore_nullable=True)


def _impression(n: int, campaign: str, creative: str) -> bytes:
    return json.dumps({"impression_id": f"imp-loss-{n:05d}", "timestamp": "2026-11-16T10:00:00Z", "user_id": f"u-{n}",
                       "creative_id": creative, "campaign_id": campaign, "website": "news.example.com",
                       "cost": 0.001}).encode()


def test_offsets_gone_from_kafka_are_counted_and_the_stream_goes_on(spark, kafka_broker, tmp_path):
    conf = kafka_conf_file(tmp_path / "conf.yaml", kafka_broker, "loss", str(tmp_path / "landing"),
                           str(tmp_path / "lake"), fail_on_data_loss=False)
    settings = load_conf(conf)
    Generator(GeneratorOptions(impressions=10)).write_creatives(str(tmp_path / "landing"))
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    topics = settings.conf["kafka"]["topics"]
    topic = topics["impressions"]
    new = [NewTopic(name, num_partitions=1, replication_factor=1) for name in topics.values()]
    for future in admin.create_topics(new).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})

    def produce(first: int, count: int) -> None:
        for n in range(first, first + count):
            producer.produce(topic, key=b"u", value=_impression(n, "cmp-0001", "cr-0011"))
        assert producer.flush(30) == 0

    produce(0, 100)
    assert pipeline.run(spark, settings, available_now=True)["kafka_offsets_lost"] == {}
    produce(100, 100)
    # What retention does to old segments, done at once: offsets 100..149 are gone before they are read.
    for future in admin.delete_records([TopicPartition(topic, 0, 150)]).values():
        future.result(30)
    lost = pipeline.run(spark, settings, available_now=True)["kafka_offsets_lost"]
    assert lost == {"advx_impressions": 50}
    ids = read_table(spark, settings, "silver/impressions").select("impression_id")
    expected = spark.createDataFrame([(f"imp-loss-{n:05d}",) for n in [*range(100), *range(150, 200)]], ids.schema)
    assert_df_equality(ids, expected, ignore_row_order=True, ignore_nullable=True)


def test_secrets_stay_out_of_logs_lake_and_committed_conf(kafka_broker, tmp_path):
    """The pipeline runs as a job against the SASL listener, logging at INFO; the password is nowhere."""
    password = kafka_broker.sasl_password
    conf_path = kafka_conf_file(
        tmp_path / "conf.yaml", kafka_broker, "sasl", str(tmp_path / "landing"), str(tmp_path / "lake"),
        bootstrap_servers=kafka_broker.sasl_bootstrap,
        options={"kafka.security.protocol": "SASL_PLAINTEXT", "kafka.sasl.mechanism": "PLAIN",
                 "kafka.sasl.jaas.config": "${ADVX_TEST_KAFKA_JAAS}"},
        producer_options={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                          "sasl.username": "advx", "sasl.password": "${ADVX_TEST_KAFKA_PASSWORD}"},
    )
    with open(conf_path, encoding="utf-8") as fh:
        conf = yaml.safe_load(fh)
    conf["spark"]["log_level"] = "INFO"
    with open(conf_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(conf, fh)
    env = {**os.environ, "ADVX_PSEUDONYMIZATION_KEY": TEST_KEY, "ADVX_TEST_KAFKA_PASSWORD": password,
           "ADVX_TEST_KAFKA_JAAS": ('org.apache.kafka.common.security.plain.PlainLoginModule required '
                                    f'username="advx" password="{password}";')}
    landing = str(tmp_path / "landing")
    generate = subprocess.run(
        [sys.executable, "jobs/generate.py", "--out", landing, "--kafka", "--conf", conf_path,
         "--impressions", "300", "--seed", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert generate.returncode == 0, generate.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--conf", conf_path, "--available-now"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(landing, "manifest.json"), encoding="utf-8") as fh:
        produced = json.load(fh)["input_records"]["impressions"]
    assert f"impressions batch 0: {produced:,} in" in run.stderr  # the SASL listener delivered every message
    assert "ConsumerConfig values" in run.stderr        # the client logged its settings, and so had the chance
    for name, text in (("generator output", generate.stdout + generate.stderr),
                       ("pipeline output", run.stdout + run.stderr)):
        assert password not in text, f"the Kafka password appears in the {name}"
    for path in glob.glob(str(tmp_path / "lake" / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                assert password.encode() not in fh.read(), f"the Kafka password is in {path}"

    secret_words = ("password", "jaas", "secret", "token", "key")
    for conf_file in glob.glob(os.path.join(ROOT, "conf", "*.yaml")):
        with open(conf_file, encoding="utf-8") as fh:
            kafka = (yaml.safe_load(fh) or {}).get("kafka") or {}
        for section in ("options", "producer_options"):
            for name, value in (kafka.get(section) or {}).items():
                if any(word in name.lower() for word in secret_words):
                    assert str(value).startswith("${") and str(value).endswith("}"), \
                        f"{conf_file}: kafka.{section}.{name} must come from the environment"
