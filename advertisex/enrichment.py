"""Standardisation, enrichment and pseudonymisation of valid records.

User agents are parsed with maintained libraries (``user_agents`` on top of ua-parser's rules for
device/browser/OS, ``crawlerdetect`` for bots) and IPs are placed with iptocc's offline database.
Both run in Python with the user id's HMAC, in one Arrow UDF (``user_details``) that looks up
each distinct value of an Arrow batch once.
"""
from __future__ import annotations

import functools
import hashlib
import hmac

import pyarrow as pa
import pyarrow.compute as pc
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


def _per_distinct(values: pa.Array, lookup, types: list[pa.DataType]) -> list[pa.Array]:
    """Per row of ``values``, the results ``lookup`` gives (a list of distinct values -> one list per
    result field, of ``types``, in the order of its input): each distinct value is looked up once,
    and a NULL value has NULL results. Dictionary-encoding and the take back to rows run in
    Arrow's C++, so no row becomes a Python object."""
    encoded = pc.dictionary_encode(values)
    fields = lookup(encoded.dictionary.to_pylist())
    return [pa.array(field, type=kind).take(encoded.indices) for field, kind in zip(fields, types, strict=True)]


def _hmac_hex(key: bytes, values: list[str]) -> list[str]:
    return [hmac.new(key, v.encode("utf-8"), hashlib.sha256).hexdigest() for v in values]


def hmac_sha256_hex(key: bytes):
    """A Column -> Column function: HMAC-SHA256 of a string, as lower-case hex.

    An Arrow UDF rather than sha2 built-ins on purpose: a JVM expression would carry key-derived
    pads as literals of the query plan, and plans appear in error messages and logs. The UDF's
    closure holds the key instead; its cost is measured in docs/BENCHMARKS.md.
    """

    @F.arrow_udf(T.StringType())
    def user_key(values: pa.Array) -> pa.Array:
        (keys,) = _per_distinct(values, lambda ids: [_hmac_hex(key, ids)], [pa.string()])
        return keys

    return user_key


def with_pseudonymised_user(df: DataFrame, key: bytes) -> DataFrame:
    """Replace ``user_id`` by ``user_key`` and ``ip`` by its truncation; the raw values are gone.
    A frame that has both already (``with_user_details``) only loses the raw values."""
    if "user_key" not in df.columns:
        df = df.withColumn("user_key", hmac_sha256_hex(key)(F.col("user_id")))
    if "ip" in df.columns and "ip_truncated" not in df.columns:
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


USER_DETAILS = T.StructType([
    *UA_DETAILS.fields,
    T.StructField("country", T.StringType()),
    T.StructField("user_key", T.StringType()),
])


def user_details(key: bytes):
    """A (user_id, ip_truncated, user_agent) -> ``USER_DETAILS`` function: device type, browser, OS and
    bot flag of the user agent, country of the truncated IP, and ``user_key``, the HMAC-SHA256 of
    the user id as lower-case hex.

    One Arrow UDF for the three Python lookups, so a micro-batch's rows cross to Python once, and
    each lookup runs once per distinct value of an Arrow batch (a batch of a million impressions
    carries a few hundred user agents and some 14,000 /24 prefixes). Before, the user agents'
    distinct values were aggregated, described and broadcast in two Spark jobs of their own
    (docs/BENCHMARKS.md). The closure, not the query plan, holds the key: plans appear in
    error messages and logs.
    """

    def describe(agents: list[str]) -> list[list]:
        described = [describe_user_agent(ua) for ua in agents]
        return [[d[i] for d in described] for i in range(len(UA_DETAILS.fields))]

    @F.arrow_udf(USER_DETAILS)
    def details(user_ids: pa.Array, ips: pa.Array, agents: pa.Array) -> pa.Array:
        import iptocc

        text = pa.string()
        device, browser, os_name, is_bot = _per_distinct(agents, describe, [text, text, text, pa.bool_()])
        (country,) = _per_distinct(ips, lambda prefixes: [iptocc.country_code(prefixes)], [text])
        (user_key,) = _per_distinct(user_ids, lambda ids: [_hmac_hex(key, ids)], [text])
        return pa.StructArray.from_arrays(
            [device, browser, os_name, pc.fill_null(is_bot, False), country, user_key],
            names=USER_DETAILS.fieldNames())

    return details


def with_user_details(df: DataFrame, key: bytes, user_agent: str = "user_agent") -> DataFrame:
    """Add device_type, browser, os and is_bot (from ``user_agent``), ip_truncated and its country,
    and user_key (``user_details``). ``user_id`` and ``ip`` stay for the IVT deny-lists;
    ``with_pseudonymised_user`` drops them.

    The country lookup uses the /24 or /48 prefix, never the full address; country databases do
    not resolve finer than that.
    """
    df = df.withColumn("ip_truncated", truncate_ip(F.col("ip")))
    details = user_details(key)(F.col("user_id"), F.col("ip_truncated"), F.col(user_agent))
    return (
        df.withColumn("_user_details", details)
        .withColumns({name: F.col(f"_user_details.{name}") for name in USER_DETAILS.fieldNames()})
        .drop("_user_details")
    )


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
