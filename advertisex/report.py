"""The campaign report printed at the end of the demo: small aggregates of the lake's tables."""
from __future__ import annotations

from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from advertisex.config import FEEDS, Settings

TABLES = [
    "bronze/impressions", "bronze/clicks_conversions", "bronze/bid_requests",
    "silver/impressions", "silver/clicks", "silver/conversions", "silver/bid_requests", "silver/dim_creatives",
    "quarantine/impressions", "quarantine/clicks_conversions", "quarantine/bid_requests",
    "gold/campaign_performance_hourly", "gold/campaign_performance_daily", "gold/attributed_clicks",
    "gold/attributed_conversions", "gold/attribution_multi_touch", "gold/bid_funnel_hourly",
]


@dataclass
class Report:
    rows: dict[str, int | None]
    quarantine: list[tuple[str, str, int]]
    duplicates: dict[str, int]
    top_campaigns: list[tuple[str, int, int, int]]
    campaigns: list[dict]


def _table(spark: SparkSession, settings: Settings, name: str):
    path = settings.table(name)
    return spark.read.format("delta").load(path) if DeltaTable.isDeltaTable(spark, path) else None


def build(spark: SparkSession, settings: Settings, top: int = 5) -> Report:
    """Aggregate the lake into a few dozen numbers (the only rows this job brings to the driver)."""
    rows = {}
    for name in TABLES:
        df = _table(spark, settings, name)
        rows[name] = df.count() if df is not None else None
    quarantine = []
    for feed in FEEDS:
        df = _table(spark, settings, f"quarantine/{feed}")
        if df is not None:
            by_rule = df.select(F.explode("reasons").alias("rule")).groupBy("rule").count().orderBy("rule")
            quarantine += [(feed, r["rule"], r["count"]) for r in by_rule.collect()]
    duplicates = {}
    metrics = _table(spark, settings, "ops/metrics")
    if metrics is not None:
        feeds = metrics.filter("feed != 'gold'")  # the correlation query's rows carry no accounting
        for r in feeds.groupBy("feed").agg(F.sum("duplicates_dropped").alias("d")).orderBy("feed").collect():
            duplicates[r["feed"]] = int(r["d"] or 0)
    top_campaigns = []
    impressions = _table(spark, settings, "silver/impressions")
    if impressions is not None:
        ranked = (
            impressions.groupBy("campaign_id")
            .agg(
                F.count_if(~F.col("is_ivt")).alias("impressions"),
                F.count_if(F.col("is_ivt")).alias("ivt_impressions"),
                F.approx_count_distinct("user_key").alias("users"),
            )
            .orderBy(F.desc("impressions"), "campaign_id")
            .limit(top)
        )
        top_campaigns = [(r["campaign_id"], r["impressions"], r["ivt_impressions"], r["users"]) for r in ranked.collect()]
    campaigns = []
    daily = _table(spark, settings, "gold/campaign_performance_daily")
    if daily is not None:
        totals = (
            daily.groupBy("campaign_id")
            .agg(*[F.sum(c).alias(c) for c in ("impressions", "clicks", "conversions", "spend", "bids", "wins")])
            .select(
                "campaign_id", "impressions", "clicks", "conversions", "spend",
                F.when(F.col("impressions") > 0, F.col("clicks") / F.col("impressions")).alias("ctr"),
                F.when(F.col("clicks") > 0, F.col("conversions") / F.col("clicks")).alias("cvr"),
                F.when(F.col("conversions") > 0, F.col("spend") / F.col("conversions")).alias("cpa"),
                F.when(F.col("bids") > 0, F.col("wins") / F.col("bids")).alias("win_rate"),
            )
            .orderBy(F.desc("impressions"), "campaign_id")
            .limit(top)
        )
        campaigns = [r.asDict() for r in totals.collect()]
    return Report(rows, quarantine, duplicates, top_campaigns, campaigns)


def render(report: Report) -> str:
    lines = ["", "AdvertiseX lake report", "", "Rows per table"]
    lines += [f"  {name:<32} {('-' if n is None else f'{n:,}'):>12}" for name, n in report.rows.items()]
    lines += ["", "Quarantine by rule"]
    lines += [f"  {feed:<20} {rule:<26} {n:>10,}" for feed, rule, n in report.quarantine] or ["  (none)"]
    lines += ["", "Duplicates dropped"]
    lines += [f"  {feed:<20} {n:>10,}" for feed, n in report.duplicates.items()] or ["  (none)"]
    lines += ["", "Top campaigns by impressions (valid, non-IVT)",
              f"  {'campaign':<12} {'impressions':>12} {'ivt':>8} {'users~':>8}"]
    lines += [f"  {c:<12} {i:>12,} {v:>8,} {u:>8,}" for c, i, v, u in report.top_campaigns] or ["  (none)"]
    lines += ["", "Campaigns from gold (all dates; valid, deduplicated, non-IVT)",
              f"  {'campaign':<12} {'impressions':>12} {'clicks':>8} {'conv':>6} {'CTR':>7} {'CVR':>7} "
              f"{'CPA':>10} {'win rate':>9}"]
    lines += [
        f"  {c['campaign_id']:<12} {c['impressions']:>12,} {c['clicks']:>8,} {c['conversions']:>6,} {_pct(c['ctr']):>7} "
        f"{_pct(c['cvr']):>7} {_money(c['cpa']):>10} {_pct(c['win_rate']):>9}"
        for c in report.campaigns
    ] or ["  (no gold yet)"]
    lines += ["", "Plots: notebooks/campaign_performance.py (CTR/CVR/CPA/ROAS over time, attribution models, bid funnel)"]
    return "\n".join(lines) + "\n"


def _money(value) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"
