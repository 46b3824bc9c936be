"""Streaming sources: file drops (and, for bid requests, the Avro container files they name), or Kafka.

Text feeds are read line by line as ``raw`` so that bronze and quarantine keep the record exactly
as it arrived. Bid-request files are Avro containers: the stream lists new files and each
micro-batch decodes them with spark-avro. A file that is not a whole container (checked from its
head and tail) goes to a per-record salvage in Python instead, and so does every file of a batch
whose read still fails: a bad file never stops the stream and its good records still land.

On Kafka every message is one record, ``source`` is ``topic/partition/offset``, and arrival order
is the message timestamp, then partition and offset. Bid requests arrive in the Confluent wire
format; a message whose header is wrong or whose schema id is not accepted is not decoded at all
and goes to quarantine as malformed.
"""
from __future__ import annotations

import functools
import io
import json
import os
from urllib.parse import unquote, urlparse

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.avro.functions import from_avro, to_avro

from advertisex.config import ConfigError, Settings, resolve_secrets
from advertisex.parsing import bid_request_avro_schema, bid_request_struct, ddl_schema

# A corrupt Avro file is quarantined with at most this much of its undecodable bytes.
MAX_QUARANTINED_BYTES = 64 * 1024


def check_landing(settings: Settings) -> None:
    """One-line error for a missing landing directory, before any query starts."""
    local = "://" not in settings.landing or settings.landing.startswith("file:")
    if not local:
        return
    root = settings.landing.removeprefix("file:")
    if not os.path.isdir(root):
        raise ConfigError(f"landing directory not found: {settings.landing}")
    for sub in ("impressions", "clicks_conversions", "bid_requests", "dims/creatives"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)


def _order(position, file_time="_metadata.file_modification_time", file="_metadata.file_path") -> F.Column:
    """Arrival order within a micro-batch: file time, file, then position in the file."""
    return F.struct(
        F.col(file_time).alias("file_time"),
        F.col(file).alias("file"),
        position.alias("position"),
    )


def with_arrival_order(batch: DataFrame) -> DataFrame:
    """``_order`` for a micro-batch of a text feed (streams cannot number rows, batches can)."""
    return batch.withColumn("_order", _order(F.monotonically_increasing_id(), "file_time", "source")).drop("file_time")


def read_text_feed(spark: SparkSession, settings: Settings, feed: str) -> DataFrame:
    """A stream of the lines of ``<landing>/<feed>/`` files (gzip or plain), one record per line."""
    return (
        spark.readStream.format("text")
        .schema("value STRING")
        .option("maxFilesPerTrigger", settings.conf["files"]["max_files_per_trigger"])
        .load(settings.feed_dir(feed))
        .select(
            F.col("value").alias("raw"),
            F.col("_metadata.file_path").alias("source"),
            F.col("_metadata.file_modification_time").alias("file_time"),
        )
    )


def read_avro_file_listing(spark: SparkSession, settings: Settings) -> DataFrame:
    """A stream of the names of new bid-request container files; contents are read per batch."""
    return (
        spark.readStream.format("binaryFile")
        .schema("path STRING, modificationTime TIMESTAMP, length BIGINT, content BINARY")
        .option("pathGlobFilter", "*.avro")
        .option("maxFilesPerTrigger", settings.conf["files"]["max_files_per_trigger"])
        .load(settings.feed_dir("bid_requests"))
        .select("path", "modificationTime")
    )


def read_dim_creatives(spark: SparkSession, settings: Settings) -> DataFrame:
    return (
        spark.readStream.format("csv")
        .option("header", "true")
        .option("mode", "PERMISSIVE")
        .schema(ddl_schema("dim_creatives.ddl"))
        .load(settings.dims_dir)
    )


def read_avro_files(spark: SparkSession, paths: list[str]) -> DataFrame:
    """Records of the given Avro container files: ``record`` (decoded), ``raw`` (its Avro body), source."""
    schema = bid_request_struct()
    return (
        spark.read.format("avro")
        .option("avroSchema", bid_request_avro_schema())
        .load(paths)
        .select(
            F.struct(*[F.col(f.name) for f in schema.fields]).alias("record"),
            F.col("_metadata.file_path").alias("source"),
            _order(F.monotonically_increasing_id()).alias("_order"),
        )
        .withColumn("raw", to_avro(F.col("record"), bid_request_avro_schema()))
    )


# The header of an Avro object container file, as the Avro specification defines it.
_CONTAINER_HEADER = {
    "type": "record", "name": "org.apache.avro.file.Header",
    "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}},
    ],
}
_HEAD_BYTES = 64 * 1024  # more than any header of this feed (its schema is about 3 KB)


@functools.lru_cache(maxsize=1)
def _container_header_schema():
    import fastavro

    return fastavro.parse_schema(_CONTAINER_HEADER)


def _open_for_reading(path: str):
    """A random-access file for a Spark path: local paths directly, others through pyarrow's
    filesystems (S3, GCS, HDFS). Raises for a scheme neither knows."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file"):
        return open(unquote(parsed.path) if parsed.scheme else path, "rb")
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    return filesystem.open_input_file(inner)


def avro_container_is_whole(path: str) -> bool | None:
    """Whether a file has the shape of a complete Avro container: the magic bytes, a readable
    header, and the header's sync marker as its last 16 bytes (every block ends with it).

    Reads the head and the tail only. False means spark-avro would fail on the file (garbage,
    a truncated copy); True does not prove every block decodes. None: the file could not be
    opened here, so nothing is known.
    """
    import fastavro

    try:
        handle = _open_for_reading(path)
    except Exception:  # noqa: BLE001 - an unknown filesystem: let spark-avro be the judge
        return None
    with handle:
        head = handle.read(_HEAD_BYTES)
        try:
            header = fastavro.schemaless_reader(io.BytesIO(head), _container_header_schema(), None)
        except Exception:  # noqa: BLE001 - not a header at all
            return False
        if header["magic"] != b"Obj\x01":
            return False
        handle.seek(-16, os.SEEK_END)
        return handle.read(16) == header["sync"]


def read_avro_files_screened(spark: SparkSession, paths: list[str]) -> DataFrame:
    """Like ``read_avro_files``, except that files whose structure is already broken (see
    ``avro_container_is_whole``) go straight to the Python salvage instead of failing the read."""
    broken = [p for p in paths if avro_container_is_whole(p) is False]
    return _read_or_salvage(spark, [p for p in paths if p not in broken], broken)


def read_avro_files_isolating_corrupt(spark: SparkSession, paths: list[str]) -> DataFrame:
    """Like ``read_avro_files``, after a read of ``paths`` failed: each file is tried on its own,
    readable ones go through spark-avro and only the corrupt ones through the Python salvage."""
    readable, corrupt = [], []
    for path in paths:
        try:
            spark.read.format("avro").option("avroSchema", bid_request_avro_schema()).load(path).agg(F.count(F.lit(1))).collect()
            readable.append(path)
        except Exception:  # noqa: BLE001 - whatever the reader raises, the file goes to the salvage
            corrupt.append(path)
    return _read_or_salvage(spark, readable, corrupt)


def _read_or_salvage(spark: SparkSession, readable: list[str], corrupt: list[str]) -> DataFrame:
    """``readable`` files through spark-avro and ``corrupt`` ones through the salvage, as one frame."""
    parts = []
    if readable:
        parts.append(read_avro_files(spark, readable))
    if corrupt:
        parts.append(salvage_avro_files(spark, corrupt))
    return functools.reduce(DataFrame.unionByName, parts)


def empty_avro_batch(spark: SparkSession) -> DataFrame:
    schema = T.StructType([
        T.StructField("record", bid_request_struct()),
        T.StructField("source", T.StringType()),
        T.StructField("_order", T.StructType([
            T.StructField("file_time", T.TimestampType()),
            T.StructField("file", T.StringType()),
            T.StructField("position", T.LongType()),
        ])),
        T.StructField("raw", T.BinaryType()),
    ])
    return spark.createDataFrame([], schema)


_SALVAGE_SCHEMA = T.StructType([
    T.StructField("raw", T.BinaryType()),
    T.StructField("source", T.StringType()),
    T.StructField("position", T.LongType()),
    T.StructField("error", T.StringType()),
    T.StructField("file_time", T.TimestampType()),
])


def _salvage_files(batches):
    """Decode container files record by record; what cannot be decoded becomes one error row."""
    import fastavro

    schema = fastavro.parse_schema(json.loads(bid_request_avro_schema()))
    for frame in batches:
        rows = []
        for path, content, file_time in zip(frame["path"], frame["content"], frame["modificationTime"], strict=True):
            stream = io.BytesIO(content)
            position = 0
            try:
                for record in fastavro.reader(stream, reader_schema=schema):
                    body = io.BytesIO()
                    fastavro.schemaless_writer(body, schema, record)
                    rows.append((body.getvalue(), path, position, None, file_time))
                    position += 1
            except Exception as exc:  # any decoding failure: quarantine the rest of the file
                tail = content[stream.tell() if position else 0:][:MAX_QUARANTINED_BYTES]
                rows.append((tail, path, position, f"{type(exc).__name__}: {exc}"[:500], file_time))
        yield pd.DataFrame(rows, columns=_SALVAGE_SCHEMA.fieldNames())


def salvage_avro_files(spark: SparkSession, paths: list[str]) -> DataFrame:
    """The slow path for a batch with a corrupt file: same columns as ``read_avro_files``.

    Undecodable parts come out with ``record`` NULL and ``raw`` holding the bytes, base64-encoded
    later for the quarantine.
    """
    salvaged = (
        spark.read.format("binaryFile").load(paths)
        .select("path", "content", "modificationTime")
        .mapInPandas(_salvage_files, _SALVAGE_SCHEMA)
    )
    record = from_avro(F.col("raw"), bid_request_avro_schema(), {"mode": "PERMISSIVE"})
    return salvaged.select(
        F.when(F.col("error").isNull(), record).alias("record"),
        F.col("source"),
        _order(F.col("position"), file_time="file_time", file="source").alias("_order"),
        F.col("raw"),
    )


# -- Kafka ----------------------------------------------------------------------------------------
CONFLUENT_HEADER_BYTES = 5  # magic byte 0x00, then the schema id as a 4-byte big-endian integer


def kafka_source_options(settings: Settings, feed: str) -> dict[str, str]:
    """Options of Spark's Kafka source for one feed; secrets resolved from the environment."""
    kafka = settings.conf["kafka"]
    options = {
        "kafka.bootstrap.servers": kafka["bootstrap_servers"],
        "subscribe": kafka["topics"][feed],
        "startingOffsets": kafka["starting_offsets"],
        "maxOffsetsPerTrigger": str(kafka["max_offsets_per_trigger"]),
        "failOnDataLoss": str(bool(kafka["fail_on_data_loss"])).lower(),
    }
    options.update(resolve_secrets(kafka["options"], "kafka.options"))
    return options


def confluent_avro_body(value: Column | str, schema_ids: list[int]) -> Column:
    """The Avro body of a Confluent wire-format message, or NULL when the header is not ours."""
    value = F.col(value) if isinstance(value, str) else value
    header = F.hex(F.substring(value, 1, CONFLUENT_HEADER_BYTES))
    schema_id = F.conv(F.substring(header, 3, 8), 16, 10).cast("long")
    accepted = (
        (F.length(value) > CONFLUENT_HEADER_BYTES)
        & (F.substring(header, 1, 2) == F.lit("00"))
        & schema_id.isin(*schema_ids)
    )
    body = F.substring(value, F.lit(CONFLUENT_HEADER_BYTES + 1), F.length(value) - CONFLUENT_HEADER_BYTES)
    return F.when(accepted, body)


def to_kafka_records(messages: DataFrame, feed: str, schema_ids: list[int]) -> DataFrame:
    """Kafka rows -> the columns a feed's micro-batch needs: raw, source, _order (and record)."""
    order = F.struct(
        F.col("timestamp").alias("file_time"),
        F.concat_ws("/", "topic", F.col("partition").cast("string")).alias("file"),
        F.col("offset").alias("position"),
    )
    source = F.concat_ws("/", "topic", F.col("partition").cast("string"), F.col("offset").cast("string"))
    if feed != "bid_requests":
        return messages.select(F.col("value").cast("string").alias("raw"), source.alias("source"), order.alias("_order"))
    body = confluent_avro_body("value", schema_ids)
    record = from_avro(body, bid_request_avro_schema(), {"mode": "PERMISSIVE"})
    return messages.select(
        F.when(body.isNotNull(), record).alias("record"),
        source.alias("source"),
        order.alias("_order"),
        F.col("value").alias("raw"),
    )


def read_kafka_feed(spark: SparkSession, settings: Settings, feed: str) -> DataFrame:
    """A stream of one feed's topic, as records ready for bronze."""
    messages = spark.readStream.format("kafka").options(**kafka_source_options(settings, feed)).load()
    return to_kafka_records(messages, feed, settings.conf["kafka"]["schema_registry_ids"])
