"""Silver: valid records, standardised, deduplicated, enriched and pseudonymised.

Every function here is DataFrame -> DataFrame and knows nothing of streams; the micro-batch
wiring in ``advertisex.pipeline`` chains them and writes the results.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from advertisex.enrichment import (
    normalize_website,
    with_event_date,
    with_ivt,
    with_pseudonymised_user,
    with_user_details,
)

SILVER_KEYS = {
    "impressions": "impression_id",
    "clicks": "event_id",
    "conversions": "event_id",
    "bid_requests": "auction_id",
}

IMPRESSION_COLUMNS = [
    "impression_id", "event_time", "event_date", "event_hour", "campaign_id", "advertiser_id",
    "creative_id", "user_key", "website", "auction_id", "cost", "currency", "ip_truncated",
    "country", "device_type", "browser", "os", "is_ivt", "ivt_reason", "source", "ingested_at",
]
CLICK_COLUMNS = [
    "event_id", "event_time", "event_date", "event_hour", "campaign_id", "advertiser_id",
    "creative_id", "impression_id", "user_key", "is_ivt", "ivt_reason", "source", "ingested_at",
]
CONVERSION_COLUMNS = [
    "event_id", "event_time", "event_date", "event_hour", "campaign_id", "advertiser_id",
    "creative_id", "impression_id", "conversion_type", "conversion_value", "currency", "user_key",
    "is_ivt", "ivt_reason", "source", "ingested_at",
]
BID_REQUEST_COLUMNS = [
    "auction_id", "event_time", "event_date", "event_hour", "user_key", "ip_truncated", "country",
    "device_type", "os", "browser", "auction_type", "floor_price", "currency", "website",
    "placement_id", "width", "height", "targeted_campaign_ids", "has_bid", "bid_campaign_id",
    "bid_creative_id", "bid_price", "is_ivt", "ivt_reason", "source", "ingested_at",
]
DIM_CREATIVE_COLUMNS = ["creative_id", "campaign_id", "advertiser_id", "format", "width", "height"]

PARTITIONS = {
    "impressions": ["event_date", "campaign_id"],
    "clicks": ["event_date", "campaign_id"],
    "conversions": ["event_date", "campaign_id"],
    "bid_requests": ["event_date"],
}

# The columns whose file statistics reads of silver skip files by (``lake.stats_only``): gold's
# reads by the hour (``event_hour``) and by event time, the id lookup bounded to a batch's event
# times, and the read-back of one micro-batch's rows by its tag (``ingest_batch``). The partition
# columns need none; Delta keeps none for a boolean such as ``is_ivt``.
STATS_COLUMNS = ["event_time", "event_hour", "ingest_batch"]


@dataclass(frozen=True)
class Privacy:
    """What silver needs to pseudonymise and flag records."""

    key: bytes
    denylisted_users: tuple[str, ...] = ()
    denylisted_ips: tuple[str, ...] = ()


def with_creative_dimension(df: DataFrame, dim: DataFrame) -> DataFrame:
    """``dim_campaign_id`` and ``advertiser_id`` of the record's creative (NULL when unknown)."""
    creatives = dim.select(
        F.col("creative_id").alias("_dim_creative_id"),
        F.col("campaign_id").alias("dim_campaign_id"),
        F.col("advertiser_id"),
    )
    return (
        df.join(F.broadcast(creatives), on=df["creative_id"] == creatives["_dim_creative_id"], how="left")
        .drop("_dim_creative_id")
    )


def with_campaign_advertiser(df: DataFrame, dim: DataFrame) -> DataFrame:
    """``advertiser_id`` of the record's campaign, for feeds that name a campaign but no creative."""
    # One partition (the dimension is a few hundred rows) already holds each campaign's rows
    # together, so the deduplication plans no shuffle: one Spark job fewer per micro-batch.
    advertisers = (
        dim.select(F.col("campaign_id").alias("_dim_campaign_id"), "advertiser_id")
        .coalesce(1)
        .dropDuplicates(["_dim_campaign_id"])
    )
    return (
        df.join(F.broadcast(advertisers), on=df["campaign_id"] == advertisers["_dim_campaign_id"], how="left")
        .drop("_dim_campaign_id")
    )


# Staging columns silver does not keep. Dropped before deduplication, which shuffles whole rows:
# the raw JSON alone doubled the cost of that shuffle (10.5 s against 6.2 s for 200k impressions).
_STAGING_ONLY = ["raw", "record", "reasons", "_malformed", "timestamp_raw", "cost_raw", "conversion_value_raw"]


def keep_first_per_id(df: DataFrame, key: str) -> DataFrame:
    """One row per ``key``: the first seen, by (file time, source, position in the batch).

    Staging-only columns (the raw record, rule results) do not survive it. A window rather than
    ``min_by(struct(...))``: an aggregate over whole rows runs as a sort aggregate on both sides
    of the shuffle, the window sorts once (5.6 s against 6.6 s for a million impressions).
    """
    first = Window.partitionBy(key).orderBy("_order")
    return (
        df.drop(*_STAGING_ONLY)
        .withColumn("_rank", F.row_number().over(first))
        .filter(F.col("_rank") == 1)
        .drop("_rank")
    )


def _standardise(df: DataFrame, privacy: Privacy) -> DataFrame:
    return (
        df.transform(with_event_date)
        .transform(with_ivt, list(privacy.denylisted_users), list(privacy.denylisted_ips))
        .transform(with_pseudonymised_user, privacy.key)
    )


def to_silver_impressions(valid: DataFrame, privacy: Privacy) -> DataFrame:
    return (
        valid.transform(keep_first_per_id, "impression_id")
        .withColumn("campaign_id", F.coalesce(F.col("campaign_id"), F.col("dim_campaign_id")))
        .withColumn("website", normalize_website(F.col("website")))
        .transform(with_user_details, privacy.key)
        .transform(_standardise, privacy)
        .select(*IMPRESSION_COLUMNS)
    )


def _to_silver_events(valid: DataFrame, event_type: str, privacy: Privacy, columns: list[str]) -> DataFrame:
    return (
        valid.filter(F.col("event_type") == event_type)
        .transform(keep_first_per_id, "event_id")
        .transform(_standardise, privacy)
        .select(*columns)
    )


def to_silver_clicks(valid: DataFrame, privacy: Privacy) -> DataFrame:
    return _to_silver_events(valid, "click", privacy, CLICK_COLUMNS)


def to_silver_conversions(valid: DataFrame, privacy: Privacy) -> DataFrame:
    return _to_silver_events(valid, "conversion", privacy, CONVERSION_COLUMNS)


def to_silver_bid_requests(valid: DataFrame, privacy: Privacy) -> DataFrame:
    return (
        valid.transform(keep_first_per_id, "auction_id")
        .withColumn("website", normalize_website(F.col("site_domain")))
        .transform(with_user_details, privacy.key)
        .transform(_standardise, privacy)
        .withColumn("country", F.coalesce(F.col("country"), F.col("exchange_country")))
        .withColumn("device_type", F.coalesce(F.col("exchange_device_type"), F.col("device_type")))
        .withColumn("os", F.coalesce(F.col("exchange_os"), F.col("os")))
        .select(*BID_REQUEST_COLUMNS)
    )


def to_dim_creatives(df: DataFrame) -> DataFrame:
    """Creatives dimension rows; the last row read for a creative wins."""
    return (
        df.select(*[F.trim(F.col(c)).alias(c) if c in ("creative_id", "campaign_id", "advertiser_id", "format") else F.col(c)
                    for c in DIM_CREATIVE_COLUMNS])
        .filter(F.col("creative_id").isNotNull() & (F.col("creative_id") != ""))
        .dropDuplicates(["creative_id"])
        .select(*DIM_CREATIVE_COLUMNS)
    )
