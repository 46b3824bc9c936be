"""Standardisation, enrichment and pseudonymisation of valid records.

User agents are parsed with maintained libraries (``user_agents`` on top of ua-parser's rules for
device/browser/OS, ``crawlerdetect`` for bots) and IPs are placed with iptocc's offline database.
Both run in Python, so they run once per *distinct* value of a micro-batch and are joined back:
a batch of a million impressions carries a few hundred distinct user agents.
"""
from __future__ import annotations

import functools
import hashlib

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

UA_DETAILS = T.StructType([
    T.StructField("device_type", T.StringType()),
    T.StructField("browser", T.StringType()),
    T.StructField("os", T.StringType()),
    T.StructField("is_bot", T.BooleanType()),
])
_CTV_MARKERS = ("smart-tv", "smarttv", "appletv", "roku", "crkey", "hbbtv", "tizen", "webos", " tv ")


def normalize_website(col: Column) -> Column:
    """Lower-case host of a domain or URL, without scheme, credentials, port, path or ``www.``."""
    host = F.regexp_extract(F.lower(F.trim(col)), r"^(?:[a-z][a-z0-9+.\-]*://)?(?:[^@/]*@)?([^/:?#]+)", 1)
    return F.nullif(F.regexp_replace(host, r"^www\.", ""), F.lit(""))


def with_event_date(df: DataFrame) -> DataFrame:
    return df.withColumn("event_date", F.to_date("event_time")).withColumn("event_hour", F.hour("event_time"))


def truncate_ip(col: Column) -> Column:
    """IPv4 to its /24 (a.b.c.0), IPv6 to its /48 (first three groups then ``::``); junk to NULL."""
    ipv4 = r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$"
    head = F.split(F.split(F.lower(col), "::").getItem(0), ":")
    first_three = F.array_join(F.slice(head, 1, 3), ":")
    ipv6 = F.when(F.lower(col).startswith("::"), F.lit("::")).otherwise(F.concat(first_three, F.lit("::")))
    return (
        F.when(col.rlike(ipv4), F.regexp_replace(col, r"\.\d{1,3}$", ".0"))
        .when(col.rlike(r"^[0-9A-Fa-f:]+$") & col.contains(":"), ipv6)
    )


def hmac_sha256_hex(key: bytes):
    """A Column -> Column function: HMAC-SHA256 of a string, as lower-case hex.

    A pandas UDF rather than sha2 built-ins on purpose: a JVM expression would carry key-derived
    pads as literals of the query plan, and plans appear in error messages and logs. The UDF's
    closure holds the key instead; its cost is measured in docs/BENCHMARKS.md.
    """

    @F.pandas_udf(T.StringType())
    def user_key(values: pd.Series) -> pd.Series:
        import hmac

        return values.map(
            lambda v: hmac.new(key, v.encode("utf-8"), hashlib.sha256).hexdigest() if isinstance(v, str) else None
        )

    return user_key


def with_pseudonymised_user(df: DataFrame, key: bytes) -> DataFrame:
    """Replace ``user_id`` by ``user_key`` and ``ip`` by its truncation; the raw values are gone."""
    df = df.withColumn("user_key", hmac_sha256_hex(key)(F.col("user_id")))
    if "ip" in df.columns:
        df = df.withColumn("ip_truncated", truncate_ip(F.col("ip")))
    return df.drop("user_id", "ip")


@functools.lru_cache(maxsize=1)
def _crawler_detector():
    from crawlerdetect import CrawlerDetect

    return CrawlerDetect()


@functools.lru_cache(maxsize=65536)
def describe_user_agent(user_agent: str) -> tuple[str, str | None, str | None, bool]:
    """(device_type, browser, os, is_bot) of one user agent string."""
    import user_agents

    parsed = user_agents.parse(user_agent)
    is_bot = bool(parsed.is_bot or _crawler_detector().isCrawler(user_agent))
    lowered = f" {user_agent.lower()} "
    if is_bot:
        device = "bot"
    elif any(marker in lowered for marker in _CTV_MARKERS):
        device = "ctv"
    elif parsed.is_tablet:
        device = "tablet"
    elif parsed.is_mobile:
        device = "mobile"
    elif parsed.is_pc:
        device = "desktop"
    else:
        device = "other"
    browser = parsed.browser.family if parsed.browser.family != "Other" else None
    os_name = parsed.os.family if parsed.os.family != "Other" else None
    return device, browser, os_name, is_bot


@F.pandas_udf(UA_DETAILS)
def _user_agent_details(user_agents: pd.Series) -> pd.DataFrame:
    rows = [describe_user_agent(ua) if isinstance(ua, str) else (None, None, None, False) for ua in user_agents]
    return pd.DataFrame(rows, columns=UA_DETAILS.fieldNames())


def with_user_agent_details(df: DataFrame, column: str = "user_agent", agents: DataFrame | None = None) -> DataFrame:
    """Add device_type, browser, os and is_bot, parsing each distinct user agent once.

    The distinct agents come from ``agents`` when given (any frame with ``column`` whose values
    cover ``df``'s), else from ``df``. Passing the cached micro-batch spares recomputing
    everything upstream of ``df`` just to list its agents.
    """
    agents = df if agents is None else agents
    distinct = (
        agents.select(F.col(column).alias("_ua")).filter(F.col("_ua").isNotNull()).distinct()
        .withColumn("_ua_details", _user_agent_details(F.col("_ua")))
    )
    joined = df.join(F.broadcast(distinct), on=df[column] == distinct["_ua"], how="left")
    return (
        joined.withColumn("device_type", F.col("_ua_details.device_type"))
        .withColumn("browser", F.col("_ua_details.browser"))
        .withColumn("os", F.col("_ua_details.os"))
        .withColumn("is_bot", F.coalesce(F.col("_ua_details.is_bot"), F.lit(False)))
        .drop("_ua", "_ua_details")
    )


@F.pandas_udf(T.StringType())
def country_of_ip(ips: pd.Series) -> pd.Series:
    import iptocc

    present = ips.notna()
    result = pd.Series([None] * len(ips), index=ips.index, dtype="object")
    if present.any():
        result[present] = iptocc.country_code(ips[present].tolist())
    return result


def with_country(df: DataFrame, fallback: str | None = None) -> DataFrame:
    """``country`` from the truncated IP (ISO alpha-2), else from ``fallback`` when given.

    The lookup uses the /24 or /48 prefix, never the full address; country databases do not
    resolve finer than that.
    """
    country = country_of_ip(F.col("ip_truncated"))
    if fallback is not None:
        country = F.coalesce(country, F.col(fallback))
    return df.withColumn("country", country)


def with_ivt(df: DataFrame, denylisted_users: list[str], denylisted_ips: list[str]) -> DataFrame:
    """``is_ivt`` and ``ivt_reason`` for what a single record shows: a bot UA or a deny-listed user/IP.

    Runs before pseudonymisation, on the raw ``user_id`` and ``ip``. The rules that need other
    events (click_before_impression, repeat_click) belong to attribution.
    """
    bot = F.col("is_bot") if "is_bot" in df.columns else F.lit(False)
    denied = F.col("user_id").isin(denylisted_users)
    if "ip" in df.columns:
        denied = denied | F.col("ip").isin(denylisted_ips)
    denied = F.coalesce(denied, F.lit(False))
    reason = F.when(bot, F.lit("bot_user_agent")).when(denied, F.lit("denylisted"))
    return df.withColumn("ivt_reason", reason).withColumn("is_ivt", reason.isNotNull())
