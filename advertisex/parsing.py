"""Wire formats to typed records: one ``parse_*`` function per feed.

Each takes a frame with the raw record (``raw``) plus source columns and returns the typed fields
the validation rules and silver need, with ``_malformed`` set where the record cannot be parsed.
Fields stay as they arrived (trimmed, empty as NULL); nothing is dropped here.
"""
from __future__ import annotations

import functools
import json
import pkgutil

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.avro.functions import from_avro

MONEY = T.DecimalType(18, 6)
CSV_COLUMNS = 10
CORRUPT = "_corrupt_record"


@functools.lru_cache(maxsize=None)
def schema_text(name: str) -> str:
    return pkgutil.get_data("advertisex", f"schemas/{name}").decode("utf-8")


def ddl_schema(name: str) -> T.StructType:
    lines = [line for line in schema_text(name).splitlines() if line.strip()]
    return T.StructType.fromDDL(" ".join(lines))


def bid_request_avro_schema() -> str:
    return schema_text("bid_request.avsc")


def bid_request_struct() -> T.StructType:
    """The Spark type of a decoded bid request, derived from the .avsc contract."""
    return _avro_to_spark(json.loads(bid_request_avro_schema()))


def _avro_to_spark(avro_type) -> T.DataType:
    if isinstance(avro_type, list):
        inner = [t for t in avro_type if t != "null"]
        return _avro_to_spark(inner[0])
    if isinstance(avro_type, str):
        return {
            "string": T.StringType(), "int": T.IntegerType(), "long": T.LongType(),
            "double": T.DoubleType(), "float": T.FloatType(), "boolean": T.BooleanType(),
            "bytes": T.BinaryType(),
        }[avro_type]
    kind = avro_type["type"]
    if avro_type.get("logicalType") == "timestamp-millis":
        return T.TimestampType()
    if kind == "record":
        return T.StructType([T.StructField(f["name"], _avro_to_spark(f["type"])) for f in avro_type["fields"]])
    if kind == "array":
        return T.ArrayType(_avro_to_spark(avro_type["items"]))
    if kind == "enum":
        return T.StringType()
    return _avro_to_spark(kind)


def clean_string(col: Column | str) -> Column:
    """Trimmed text, with empty strings as NULL."""
    col = F.col(col) if isinstance(col, str) else col
    return F.nullif(F.trim(col), F.lit(""))


def to_event_time(raw: Column) -> Column:
    """Epoch milliseconds or an ISO-8601 / 'YYYY-MM-DD HH:MM:SS[.fff]' text, as a UTC timestamp.

    The session time zone is UTC, so text without an offset is read as UTC.
    """
    is_epoch = raw.rlike(r"^-?[0-9]{9,}$")
    return F.when(is_epoch, F.timestamp_millis(raw.try_cast("long"))).otherwise(raw.try_cast("timestamp"))


def to_money(raw: Column) -> Column:
    return raw.try_cast(MONEY)


def _csv_field_count(line: Column) -> Column:
    """Number of CSV fields in a line, ignoring commas inside double-quoted fields."""
    unquoted = F.regexp_replace(line, r'"([^"]|"")*"', "")
    return F.size(F.split(unquoted, ",", -1))


def parse_impressions(df: DataFrame) -> DataFrame:
    wire = T.StructType([*ddl_schema("impressions.ddl").fields, T.StructField(CORRUPT, T.StringType())])
    parsed = F.from_json(F.col("raw"), wire, {"columnNameOfCorruptRecord": CORRUPT, "mode": "PERMISSIVE"})
    return (
        df.withColumn("_j", parsed)
        .withColumn("_malformed", F.col("_j").isNull() | F.col(f"_j.{CORRUPT}").isNotNull())
        .withColumn("impression_id", clean_string("_j.impression_id"))
        .withColumn("timestamp_raw", clean_string("_j.timestamp"))
        .withColumn("event_time", to_event_time(F.col("timestamp_raw")))
        .withColumn("creative_id", clean_string("_j.creative_id"))
        .withColumn("user_id", clean_string("_j.user_id"))
        .withColumn("website", clean_string("_j.website"))
        .withColumn("campaign_id", clean_string("_j.campaign_id"))
        .withColumn("auction_id", clean_string("_j.auction_id"))
        .withColumn("cost_raw", clean_string("_j.cost"))
        .withColumn("cost", to_money(F.col("cost_raw")))
        .withColumn("currency", F.upper(F.coalesce(clean_string("_j.currency"), F.lit("USD"))))
        .withColumn("ip", clean_string("_j.ip"))
        .withColumn("user_agent", clean_string("_j.user_agent"))
        .drop("_j")
    )


def filter_csv_headers(df: DataFrame) -> DataFrame:
    """Drop header rows and blank lines of CSV file drops; they are not records."""
    header = ",".join(ddl_schema("clicks_conversions.ddl").fieldNames())
    line = F.trim(F.regexp_replace(F.col("raw"), "^\ufeff", ""))
    return df.filter((line != F.lit(header)) & (line != F.lit("")))


def parse_clicks_conversions(df: DataFrame, conversion_types: list[str]) -> DataFrame:
    wire = ddl_schema("clicks_conversions.ddl")
    ddl = ", ".join(f"`{field.name}` {field.dataType.simpleString()}" for field in wire.fields)
    parsed = F.from_csv(F.col("raw"), ddl, {"mode": "PERMISSIVE"})
    known_types = F.array(*[F.lit(t) for t in conversion_types])
    return (
        df.withColumn("_c", parsed)
        .withColumn("_malformed", F.col("_c").isNull() | (_csv_field_count(F.col("raw")) != CSV_COLUMNS))
        .withColumn("event_id", clean_string("_c.event_id"))
        .withColumn("timestamp_raw", clean_string("_c.timestamp"))
        .withColumn("event_time", to_event_time(F.col("timestamp_raw")))
        .withColumn("event_type", F.lower(clean_string("_c.event_type")))
        .withColumn("user_id", clean_string("_c.user_id"))
        .withColumn("campaign_id", clean_string("_c.campaign_id"))
        .withColumn("creative_id", clean_string("_c.creative_id"))
        .withColumn("impression_id", clean_string("_c.impression_id"))
        .withColumn("conversion_type", F.lower(clean_string("_c.conversion_type")))
        .withColumn("conversion_type_known", F.coalesce(F.array_contains(known_types, F.col("conversion_type")), F.lit(False)))
        .withColumn("conversion_value_raw", clean_string("_c.conversion_value"))
        .withColumn("conversion_value", to_money(F.col("conversion_value_raw")))
        .withColumn("currency", F.upper(F.coalesce(clean_string("_c.currency"), F.lit("USD"))))
        .drop("_c")
    )


def with_decoded_bid_request(df: DataFrame) -> DataFrame:
    """Decode ``raw`` (an Avro binary body) into ``record``; undecodable bodies give NULL."""
    if "record" in df.columns:
        return df
    decoded = from_avro(F.col("raw"), bid_request_avro_schema(), {"mode": "PERMISSIVE"})
    return df.withColumn("record", F.when(F.col("raw").isNotNull(), decoded))


def parse_bid_requests(df: DataFrame) -> DataFrame:
    r = "record"
    return (
        df.transform(with_decoded_bid_request)
        .withColumn("_malformed", F.col(r).isNull() | F.col(f"{r}.auction_id").isNull())
        .withColumn("auction_id", clean_string(f"{r}.auction_id"))
        .withColumn("event_time", F.col(f"{r}.timestamp"))
        .withColumn("user_id", clean_string(f"{r}.user.user_id"))
        .withColumn("ip", clean_string(f"{r}.user.ip"))
        .withColumn("exchange_country", F.upper(clean_string(f"{r}.user.country")))
        .withColumn("exchange_device_type", F.lower(clean_string(f"{r}.user.device_type")))
        .withColumn("exchange_os", clean_string(f"{r}.user.os"))
        .withColumn("user_agent", clean_string(f"{r}.user.user_agent"))
        .withColumn("auction_type", F.col(f"{r}.auction.auction_type"))
        .withColumn("floor_price", F.col(f"{r}.auction.floor_price").cast(MONEY))
        .withColumn("currency", F.upper(F.coalesce(clean_string(f"{r}.auction.currency"), F.lit("USD"))))
        .withColumn("site_domain", clean_string(f"{r}.auction.site.domain"))
        .withColumn("placement_id", F.col(f"{r}.auction.placement.placement_id"))
        .withColumn("width", F.col(f"{r}.auction.placement.width"))
        .withColumn("height", F.col(f"{r}.auction.placement.height"))
        .withColumn("targeted_campaign_ids", F.col(f"{r}.targeting.campaign_ids"))
        .withColumn("has_bid", F.col(f"{r}.bid").isNotNull())
        .withColumn("bid_campaign_id", F.col(f"{r}.bid.campaign_id"))
        .withColumn("bid_creative_id", F.col(f"{r}.bid.creative_id"))
        .withColumn("bid_price", F.col(f"{r}.bid.bid_price").cast(MONEY))
    )


def bid_request_raw_text() -> Column:
    """A bid request as quarantine text: its JSON when decodable, else its bytes in base64.

    An expression for the quarantine write rather than a parsed column, so that it is computed
    for the few quarantined records only.
    """
    return F.when(F.col("record").isNotNull(), F.to_json(F.col("record"))).otherwise(F.base64(F.col("raw")))
