"""Gold, SPEC §4: campaign, attribution and bid-funnel tables for a range of event dates.

``built`` takes silver for the dates and the days before them that can explain them
(``Windows.lookback``), plus the attribution candidates of those events, and gives every gold
table's rows for the dates.
The backfill finds the candidates with batch joins; the streaming correlation query collects them
with stream-stream joins. Both then call ``built``, so a date's numbers follow one set of rules.
"""
from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from typing import Iterator

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from advertisex import attribution
from advertisex.attribution import Windows
from advertisex.config import parse_interval

MONEY = "decimal(18,6)"
TABLES = {
    "campaign_performance_hourly": ["event_date", "campaign_id"],
    "campaign_performance_daily": ["event_date", "campaign_id"],
    "attributed_clicks": ["event_date", "campaign_id"],
    "attributed_conversions": ["event_date", "campaign_id"],
    "attribution_multi_touch": ["event_date", "campaign_id"],
    "bid_funnel_hourly": ["event_date"],
    # Hidden: the daily table's measures per hour (to_daily_parts), which the daily table is
    # aggregated from, so that replacing some hours of a date does not need the date's silver.
    "_daily_parts": ["event_date"],
}
DAILY_TABLE, PARTS_TABLE = "campaign_performance_daily", "_daily_parts"
# The SQL that gives a gold row's event hour, where a write replaces hours rather than dates.
HOUR_OF = {"attributed_clicks": "hour(click_time)", "attributed_conversions": "hour(conversion_time)"}
STREAMING_TABLES = [t for t in TABLES if t != "attribution_multi_touch"]  # multi-touch is the backfill's
HOURLY_KEYS = ["event_date", "event_hour", "campaign_id", "creative_id", "website", "country", "device_type"]
SILVER_TABLES = ["impressions", "clicks", "conversions", "bid_requests"]
# The silver columns gold reads from its two large inputs. ``built`` caches these alone: a cached
# silver row with the rest (user agent parts, IPs, lineage) costs a scan and memory for nothing.
IMPRESSION_COLUMNS = ["impression_id", "event_time", "event_date", "event_hour", "campaign_id", "creative_id",
                      "website", "country", "device_type", "user_key", "cost", "is_ivt"]
BID_REQUEST_COLUMNS = ["auction_id", "event_date", "event_hour", "website", "country", "floor_price",
                       "has_bid", "bid_campaign_id", "bid_price", "is_ivt"]


def lookback_days(windows: Windows) -> int:
    return -(-windows.lookback() // dt.timedelta(days=1))


def lookahead_days(windows: Windows) -> int:
    return -(-windows.lookahead() // dt.timedelta(days=1))


def _ratio(numerator: Column, denominator: Column, cast: str = "double") -> Column:
    return F.when(denominator != 0, (numerator / denominator).cast(cast))


def _impression_dims(impressions: DataFrame, prefix: str) -> DataFrame:
    return impressions.select(
        F.col("impression_id").alias(f"{prefix}_impression_id"),
        F.col("creative_id").alias(f"{prefix}_creative_id"),
        F.col("website").alias(f"{prefix}_website"),
        F.col("country").alias(f"{prefix}_country"),
        F.col("device_type").alias(f"{prefix}_device_type"),
    )


def _with_dims_of(df: DataFrame, impressions: DataFrame, impression_id: str, prefix: str) -> DataFrame:
    """The creative, website, country and device of the impression a click or conversion touched."""
    dims = _impression_dims(impressions, prefix)
    return (
        df.join(dims, on=F.col(impression_id) == F.col(f"{prefix}_impression_id"), how="left")
        .withColumn("creative_id", F.coalesce(F.col(f"{prefix}_creative_id"), F.col("creative_id")))
        .withColumn("website", F.col(f"{prefix}_website"))
        .withColumn("country", F.col(f"{prefix}_country"))
        .withColumn("device_type", F.col(f"{prefix}_device_type"))
    )


def _zero() -> Column:
    return F.lit(0).cast("long")


def to_campaign_hourly(impressions: DataFrame, clicks: DataFrame, conversions: DataFrame,
                       touched: DataFrame | None = None) -> DataFrame:
    """Counts per hour and campaign by creative, website, country and device.

    Clicks and conversions take the website, country and device of the impression they are
    attributed to (NULL when none), looked up in ``touched`` (default ``impressions``): that
    impression may be from an earlier date. Each event counts in its own hour.
    """
    touched = impressions if touched is None else touched
    counted = ~F.col("is_ivt")
    imp_rows = impressions.select(
        *HOURLY_KEYS,
        F.when(counted, 1).otherwise(0).alias("impressions"), _zero().alias("clicks"), _zero().alias("conversions"),
        F.lit(0).cast(MONEY).alias("conversion_value"),
        F.when(counted, F.coalesce(F.col("cost"), F.lit(0))).otherwise(0).cast(MONEY).alias("spend"),
        F.when(~counted, 1).otherwise(0).alias("ivt_impressions"), _zero().alias("ivt_clicks"),
    )
    click_rows = _with_dims_of(clicks, touched, "matched_impression_id", "m").select(
        *HOURLY_KEYS,
        _zero().alias("impressions"), F.when(counted, 1).otherwise(0).alias("clicks"), _zero().alias("conversions"),
        F.lit(0).cast(MONEY).alias("conversion_value"), F.lit(0).cast(MONEY).alias("spend"),
        _zero().alias("ivt_impressions"), F.when(~counted, 1).otherwise(0).alias("ivt_clicks"),
    )
    conversion_rows = _with_dims_of(conversions.filter(counted), touched, "touch_impression_id", "t").select(
        *HOURLY_KEYS,
        _zero().alias("impressions"), _zero().alias("clicks"), F.lit(1).alias("conversions"),
        F.coalesce(F.col("conversion_value"), F.lit(0)).cast(MONEY).alias("conversion_value"),
        F.lit(0).cast(MONEY).alias("spend"), _zero().alias("ivt_impressions"), _zero().alias("ivt_clicks"),
    )
    sums = ["impressions", "clicks", "conversions", "ivt_impressions", "ivt_clicks"]
    return (
        imp_rows.unionByName(click_rows).unionByName(conversion_rows)
        .groupBy(*HOURLY_KEYS)
        .agg(*[F.sum(c).cast("long").alias(c) for c in sums],
             F.sum("conversion_value").cast(MONEY).alias("conversion_value"), F.sum("spend").cast(MONEY).alias("spend"))
        .select(*HOURLY_KEYS, "impressions", "clicks", "conversions", "conversion_value", "spend",
                "ivt_impressions", "ivt_clicks")
    )


DAILY_COLUMNS = [
    "event_date", "campaign_id", "impressions", "unique_users", "clicks", "attributed_clicks", "conversions",
    "attributed_conversions", "conversion_value", "spend", "ivt_impressions", "ivt_clicks",
    "ctr", "cvr", "cpm", "cpc", "cpa", "roas", "bids", "wins", "win_rate", "unique_users_sketch",
]
PART_KEYS = ["event_date", "event_hour", "campaign_id"]
PART_COUNTS = ["impressions", "ivt_impressions", "clicks", "attributed_clicks", "ivt_clicks", "conversions",
               "attributed_conversions", "bids", "wins"]
PART_MONEY = ["spend", "conversion_value"]


def to_daily_parts(impressions: DataFrame, clicks: DataFrame, conversions: DataFrame, bid_requests: DataFrame) -> DataFrame:
    """The daily table's measures per hour and campaign: every count and sum, and an HLL sketch of
    the hour's users (non-IVT impressions). Bids and wins count in the bid request's hour, under the
    campaign that bid (SPEC's funnel has no campaign)."""
    counted = ~F.col("is_ivt")
    imp = impressions.groupBy(*PART_KEYS).agg(
        F.count_if(counted).alias("impressions"),
        F.sum(F.when(counted, F.coalesce(F.col("cost"), F.lit(0)))).cast(MONEY).alias("spend"),
        F.count_if(~counted).alias("ivt_impressions"),
        F.hll_sketch_agg(F.when(counted, F.col("user_key"))).alias("unique_users_sketch"),
    )
    clk = clicks.groupBy(*PART_KEYS).agg(
        F.count_if(counted).alias("clicks"),
        F.count_if(counted & (F.col("match_type") != "none")).alias("attributed_clicks"),
        F.count_if(~counted).alias("ivt_clicks"),
    )
    cnv = conversions.filter(counted).groupBy(*PART_KEYS).agg(
        F.count(F.lit(1)).alias("conversions"),
        F.count_if(F.col("touch") != "none").alias("attributed_conversions"),
        F.sum(F.coalesce(F.col("conversion_value"), F.lit(0))).cast(MONEY).alias("conversion_value"),
    )
    bid = (
        bid_requests.filter(~F.col("is_ivt") & F.col("has_bid"))
        .groupBy("event_date", "event_hour", F.col("bid_campaign_id").alias("campaign_id"))
        .agg(F.count(F.lit(1)).alias("bids"), F.count_if(F.col("won")).alias("wins"))
    )
    parts = imp.join(clk, on=PART_KEYS, how="full").join(cnv, on=PART_KEYS, how="full").join(bid, on=PART_KEYS, how="full")
    return parts.select(
        *PART_KEYS,
        *[F.coalesce(F.col(c), F.lit(0)).cast("long").alias(c) for c in PART_COUNTS],
        *[F.coalesce(F.col(c), F.lit(0)).cast(MONEY).alias(c) for c in PART_MONEY],
        "unique_users_sketch",
    )


def daily_from_parts(parts: DataFrame) -> DataFrame:
    """SPEC §4 metrics per date and campaign, plus the campaign's ``bids``, ``wins`` and
    ``win_rate``, aggregated from ``to_daily_parts`` rows.

    ``unique_users_sketch`` is the union of the hours' sketches, the HLL sketch behind
    ``unique_users``: merge sketches (hll_union_agg) to count users over several days or campaigns.
    """
    spend = F.col("spend")
    return (
        parts.groupBy("event_date", "campaign_id")
        .agg(*[F.sum(c).cast("long").alias(c) for c in PART_COUNTS],
             *[F.sum(c).cast(MONEY).alias(c) for c in PART_MONEY],
             F.hll_union_agg("unique_users_sketch").alias("unique_users_sketch"))
        .withColumn("unique_users", F.coalesce(F.hll_sketch_estimate("unique_users_sketch"), F.lit(0)).cast("long"))
        .withColumn("ctr", _ratio(F.col("clicks"), F.col("impressions")))
        .withColumn("cvr", _ratio(F.col("conversions"), F.col("clicks")))
        .withColumn("cpm", _ratio(spend * 1000, F.col("impressions"), MONEY))
        .withColumn("cpc", _ratio(spend, F.col("clicks"), MONEY))
        .withColumn("cpa", _ratio(spend, F.col("conversions"), MONEY))
        .withColumn("roas", _ratio(F.col("conversion_value"), spend))
        .withColumn("win_rate", _ratio(F.col("wins"), F.col("bids")))
        .select(*DAILY_COLUMNS)
    )


def in_hours(hours: dict[dt.date, list[int]], hour: Column | None = None) -> Column:
    """Rows of the given hours of the given dates (``hour``: the row's hour, default event_hour).
    The dates also stand alone in the condition, where Delta prunes partitions by them."""
    hour = F.col("event_hour") if hour is None else hour
    condition = F.lit(False)
    for date, of_date in sorted(hours.items()):
        condition = condition | ((F.col("event_date") == F.lit(date)) & hour.isin(*of_date))
    return F.col("event_date").isin(*[F.lit(d) for d in sorted(hours)]) & condition


def hours_of(df: DataFrame, time: str) -> dict[dt.date, list[int]]:
    """The (UTC) hours that the timestamps in column ``time`` fall in, by date."""
    rows = df.select(F.to_date(time).alias("date"), F.hour(time).alias("hour")).filter(F.col("date").isNotNull())
    hours: dict[dt.date, list[int]] = {}
    for r in rows.distinct().collect():
        hours.setdefault(r["date"], []).append(r["hour"])
    return {date: sorted(of_date) for date, of_date in hours.items()}


def click_hours(hours: dict[dt.date, list[int]], conversions: DataFrame, candidates: DataFrame, windows: Windows
                ) -> dict[dt.date, list[int]]:
    """The hours of clicks that resolving the scope's clicks and ``conversions`` needs: the scope's
    hours and those of the clicks the conversions may touch, each with the hours that reach
    ``repeat_click`` back before it. A click is a repeat when the user's previous click on the same
    impression is at most that much older, so every click in those hours has its previous click
    (or none closer) among them, and resolves as it would over the whole lookback."""
    touched = (
        candidates.filter(F.col("kind") == attribution.CONVERSION_CLICK)
        .join(F.broadcast(conversions.select(F.col("event_id").alias("scope_id"))),
              on=F.col("event_id") == F.col("scope_id"), how="left_semi")
    )
    starts = {dt.datetime.combine(date, dt.time(hour))
              for source in (hours, hours_of(touched, "match_time")) for date, of_date in source.items()
              for hour in of_date}
    back = parse_interval(windows.repeat_click)
    needed: dict[dt.date, set[int]] = {}
    for start in starts:
        at = (start - back).replace(minute=0, second=0, microsecond=0)
        while at <= start:
            needed.setdefault(at.date(), set()).add(at.hour)
            at += dt.timedelta(hours=1)
    return {date: sorted(of_date) for date, of_date in needed.items()}


def matched_within(hours: dict[dt.date, list[int]], after: str) -> Column:
    """Candidates whose match_time lies in one of the hours or up to ``after`` past its end, as
    time ranges (consecutive hours make one): Delta skips the files whose match times lie outside
    them all."""
    ranges: list[list[dt.datetime]] = []
    for start in sorted(dt.datetime.combine(date, dt.time(hour)) for date, of_date in hours.items() for hour in of_date):
        end = start + dt.timedelta(hours=1) + parse_interval(after)
        if ranges and start <= ranges[-1][1]:
            ranges[-1][1] = end  # a short filter even for a whole day
        else:
            ranges.append([start, end])
    condition = F.lit(False)
    for start, end in ranges:
        condition = condition | F.col("match_time").between(
            F.lit(start.isoformat(sep=" ")).cast("timestamp"), F.lit(end.isoformat(sep=" ")).cast("timestamp"))
    return condition


def scope_sql(table: str, first: dt.date, last: dt.date, hours: dict[dt.date, list[int]] | None = None) -> str:
    """The rows of ``table`` a write for the dates (or only the given hours of them) replaces."""
    if hours is None or table == DAILY_TABLE:  # a daily row is the whole date's
        return f"event_date >= '{first.isoformat()}' AND event_date <= '{last.isoformat()}'"
    hour = HOUR_OF.get(table, "event_hour")
    return " OR ".join(f"(event_date = '{date.isoformat()}' AND {hour} IN ({', '.join(str(h) for h in of_date)}))"
                       for date, of_date in sorted(hours.items()))


def to_attributed_clicks(clicks: DataFrame) -> DataFrame:
    """Counted clicks (valid, deduplicated, non-IVT) and the impression each is attributed to."""
    return clicks.filter(~F.col("is_ivt")).select(
        F.col("event_id").alias("click_id"),
        F.col("event_time").alias("click_time"),
        "event_date",
        "campaign_id",
        F.col("matched_impression_id").alias("impression_id"),
        "impression_time",
        "match_type",
    )


def to_attributed_conversions(conversions: DataFrame) -> DataFrame:
    return conversions.filter(~F.col("is_ivt")).select(
        F.col("event_id").alias("conversion_id"),
        F.col("event_time").alias("conversion_time"),
        "event_date",
        "campaign_id",
        "conversion_type",
        "conversion_value",
        "click_id",
        F.col("touch_impression_id").alias("impression_id"),
        "touch",
    )


def to_bid_funnel_hourly(bid_requests: DataFrame) -> DataFrame:
    """Requests, bids and wins per hour, site and country; IVT requests do not count."""
    counted = bid_requests.filter(~F.col("is_ivt"))
    return (
        counted.groupBy("event_date", "event_hour", "website", "country")
        .agg(
            F.count(F.lit(1)).alias("bid_requests"),
            F.count_if(F.col("has_bid")).alias("bids"),
            F.count_if(F.col("won")).alias("wins"),
            F.avg("floor_price").cast(MONEY).alias("avg_floor_price"),
            F.avg(F.when(F.col("has_bid"), F.col("bid_price"))).cast(MONEY).alias("avg_bid_price"),
            (F.avg("clearing_price") * 1000).cast(MONEY).alias("avg_clearing_cpm"),
        )
        .withColumn("win_rate", _ratio(F.col("wins"), F.col("bids")))
        .select("event_date", "event_hour", "website", "country", F.col("bid_requests").cast("long"),
                F.col("bids").cast("long"), F.col("wins").cast("long"), "win_rate",
                "avg_floor_price", "avg_bid_price", "avg_clearing_cpm")
    )


def to_multi_touch(conversions: DataFrame, impressions: DataFrame, clicks: DataFrame, windows: Windows) -> DataFrame:
    """Credits per conversion, model, creative and website over the user's touches in the campaign.

    A touch is a counted impression or click of the converting user in the conversion's campaign
    within ``conversion_click`` before it. A conversion without touches gets one row per model
    with creative and website NULL and credit 1, so every conversion's credits sum to 1.
    """
    imp_touches = impressions.filter(~F.col("is_ivt")).select(
        F.col("impression_id").alias("touch_id"), F.col("event_time").alias("touch_time"),
        F.col("user_key").alias("touch_user"), F.col("campaign_id").alias("touch_campaign"),
        F.col("creative_id").alias("touch_creative_id"), F.col("website").alias("touch_website"),
    )
    click_touches = (
        _with_dims_of(clicks.filter(~F.col("is_ivt")), impressions, "matched_impression_id", "m")
        .select(
            F.col("event_id").alias("touch_id"), F.col("event_time").alias("touch_time"),
            F.col("user_key").alias("touch_user"), F.col("campaign_id").alias("touch_campaign"),
            F.col("creative_id").alias("touch_creative_id"), F.col("website").alias("touch_website"),
        )
    )
    touches = imp_touches.unionByName(click_touches)
    conv = conversions.filter(~F.col("is_ivt")).select(
        F.col("event_id").alias("conversion_id"), F.col("event_time").alias("conversion_time"),
        "event_date", "campaign_id", "user_key",
    )
    in_window = (
        (conv["user_key"] == touches["touch_user"]) & (conv["campaign_id"] == touches["touch_campaign"])
        & conv["conversion_time"].between(touches["touch_time"],
                                          touches["touch_time"] + attribution.interval(windows.conversion_click))
    )
    joined = conv.join(touches, on=in_window, how="inner")
    credited = attribution.with_touch_credits(joined, windows.half_life)
    untouched = (
        conv.join(joined.select("conversion_id").distinct(), on="conversion_id", how="left_anti")
        .withColumn("model", F.explode(F.array(*[F.lit(m) for m in attribution.MODELS])))
        .withColumn("touch_creative_id", F.lit(None).cast("string"))
        .withColumn("touch_website", F.lit(None).cast("string"))
        .withColumn("credit", F.lit(1.0))
    )
    columns = ["conversion_id", "event_date", "campaign_id", "model", "touch_creative_id", "touch_website", "credit"]
    return (
        credited.select(*columns).unionByName(untouched.select(*columns))
        .groupBy("conversion_id", "event_date", "campaign_id", "model", "touch_creative_id", "touch_website")
        .agg(F.sum("credit").alias("credit"))
        .select("conversion_id", "model", "campaign_id", F.col("touch_creative_id").alias("creative_id"),
                F.col("touch_website").alias("website"), "credit", "event_date")
    )


@contextmanager
def built(silver: dict[str, DataFrame], candidates: DataFrame, windows: Windows, first: dt.date, last: dt.date,
          multi_touch: bool = True, hours: dict[dt.date, list[int]] | None = None) -> Iterator[dict[str, DataFrame]]:
    """The gold rows of the event dates ``first`` to ``last`` (or, given ``hours``, of only those
    hours of those dates), as lazy frames: every table but the daily one, which ``daily_from_parts``
    aggregates from the ``_daily_parts`` rows once they are written.

    ``silver`` holds the four event tables from ``lookback_days`` before ``first`` to ``last``
    (the backfill: to ``lookahead_days`` after it);
    ``candidates`` the attribution candidates of those events (``attribution.CANDIDATE_COLUMNS``).
    The resolved events are cached while the caller writes the tables (each table reads them
    again), and released when the ``with`` block ends.
    """
    if hours is not None and multi_touch:
        raise ValueError("multi-touch credits are built for whole dates only")
    cached: list[DataFrame] = []

    def keep(df: DataFrame) -> DataFrame:
        cached.append(df.persist(StorageLevel.MEMORY_AND_DISK))
        return cached[-1]

    def in_scope(df: DataFrame) -> DataFrame:
        df = df.filter(F.col("event_date").between(F.lit(first), F.lit(last)))
        return df if hours is None else df.filter(in_hours(hours))

    try:
        # An hour's click may be a repeat of the one before it, and an hour's conversion may touch a
        # click of yesterday. A whole date resolves the clicks of its lookback; an hour those it
        # needs (``click_hours``). Impressions and bid requests are read for the scope alone.
        if hours is None:
            clicks = keep(attribution.resolve_clicks(silver["clicks"], candidates, windows))
            conversions = keep(attribution.resolve_conversions(silver["conversions"], candidates, clicks))
        else:
            scope_conversions = in_scope(silver["conversions"])
            needed = click_hours(hours, scope_conversions, candidates, windows)
            clicks = keep(attribution.resolve_clicks(silver["clicks"].filter(in_hours(needed)), candidates, windows))
            conversions = keep(attribution.resolve_conversions(scope_conversions, candidates, clicks))
        scope_bids = in_scope(silver["bid_requests"].select(*BID_REQUEST_COLUMNS))
        wins = candidates.filter(F.col("kind") == attribution.WIN)
        if hours is not None:
            # A win candidate per won auction of the dates is most of the candidates: only those of
            # the scope's auctions, found without shuffling the rest, and read only from the files
            # whose impression times can hold them.
            auctions = scope_bids.select(F.col("auction_id").alias("scope_auction"))
            wins = (
                wins.filter(matched_within(hours, windows.bid_request))
                .join(F.broadcast(auctions), on=F.col("event_id") == F.col("scope_auction"), how="left_semi")
            )
        bid_requests = keep(attribution.resolve_wins(scope_bids, wins))
        day_clicks, day_conversions = in_scope(clicks), in_scope(conversions)
        if hours is None:
            impressions = keep(silver["impressions"].select(*IMPRESSION_COLUMNS))
            day_impressions, touched = in_scope(impressions), impressions
        else:
            # The impressions the scope's clicks and conversions are attributed to may lie in any
            # earlier hour: those alone, by id, read from their hours only rather than the lookback.
            impressions = silver["impressions"].select(*IMPRESSION_COLUMNS)
            day_impressions = keep(in_scope(impressions))
            refs = (
                day_clicks.select(F.col("matched_impression_id").alias("touched_id"),
                                  F.col("impression_time").alias("touched_time"))
                .unionByName(day_conversions.select(F.col("touch_impression_id").alias("touched_id"),
                                                    F.col("touch_impression_time").alias("touched_time")))
                .filter(F.col("touched_id").isNotNull())
            )
            touched_hours = hours_of(refs, "touched_time")
            ids = refs.select("touched_id").distinct()
            touched = keep(
                impressions.filter(in_hours(touched_hours))
                .join(F.broadcast(ids), on=F.col("impression_id") == F.col("touched_id"), how="left_semi")
            )
        tables = {
            "campaign_performance_hourly": to_campaign_hourly(day_impressions, day_clicks, day_conversions, touched),
            PARTS_TABLE: to_daily_parts(day_impressions, day_clicks, day_conversions, bid_requests),
            "attributed_clicks": to_attributed_clicks(day_clicks),
            "attributed_conversions": to_attributed_conversions(day_conversions),
            "bid_funnel_hourly": to_bid_funnel_hourly(bid_requests),
        }
        if multi_touch:
            tables["attribution_multi_touch"] = to_multi_touch(day_conversions, impressions, clicks, windows)
        yield tables
    finally:
        for df in cached:
            df.unpersist()
