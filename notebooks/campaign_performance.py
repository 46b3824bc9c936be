# Databricks notebook source
# MAGIC %md
# MAGIC # Campaign performance
# MAGIC What the gold tables say about each campaign: CTR, CVR, CPA and ROAS per day, the five
# MAGIC multi-touch attribution models side by side, and the bid funnel by site and country.
# MAGIC
# MAGIC Set the `lake` widget (Databricks) or the `ADVX_LAKE` environment variable (locally) to the
# MAGIC lake's root. Locally the figures are also saved as PNG files under `ADVX_FIGURES`
# MAGIC (default `data/figures`). Multi-touch credits exist once `jobs/backfill.py` has run.

# COMMAND ----------

import os

import matplotlib

if "DATABRICKS_RUNTIME_VERSION" not in os.environ:
    matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from advertisex.notebook import Figures, lake_root

lake = lake_root(globals())
spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
TOP = 5
figures = Figures(globals())
show = figures.show


def gold(name):
    return spark.read.format("delta").load(f"{lake}/gold/{name}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## CTR, CVR, CPA and ROAS per day for the top campaigns (by impressions)

# COMMAND ----------

daily = gold("campaign_performance_daily")
top = [r["campaign_id"] for r in daily.groupBy("campaign_id").agg(F.sum("impressions").alias("n"))
       .orderBy(F.desc("n"), "campaign_id").limit(TOP).collect()]
kpis = (
    daily.filter(F.col("campaign_id").isin(top))
    .select("event_date", "campaign_id", "impressions", "clicks", "conversions", "spend", "ctr", "cvr",
            F.col("cpa").cast("double").alias("cpa"), "roas")
    .orderBy("event_date", "campaign_id")
    .toPandas()
)
fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
for ax, metric in zip(axes.flat, ["ctr", "cvr", "cpa", "roas"], strict=True):
    for campaign, rows in kpis.groupby("campaign_id"):
        ax.plot(rows["event_date"], rows[metric], marker="o", label=campaign)
    ax.set_title(metric.upper())
axes[0][0].legend(fontsize=7)
fig.autofmt_xdate()
show("kpis_over_time", fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Attribution models side by side: conversions credited to each creative

# COMMAND ----------

multi_touch = gold("attribution_multi_touch")
models = (
    multi_touch.filter(F.col("campaign_id").isin(top))
    .groupBy("campaign_id", "model").agg(F.sum("credit").alias("credited_conversions"))
    .orderBy("campaign_id", "model")
    .toPandas()
)
by_creative = (
    multi_touch.filter(F.col("campaign_id").isin(top))
    .groupBy("creative_id", "model").agg(F.sum("credit").alias("credit"))
    .toPandas()
    .pivot(index="creative_id", columns="model", values="credit")
    .fillna(0.0)
)
fig, ax = plt.subplots(figsize=(12, 5))
if by_creative.empty:
    ax.text(0.5, 0.5, "no multi-touch credits yet: run jobs/backfill.py", ha="center")
else:
    by_creative.plot.bar(ax=ax)
    ax.set_ylabel("credited conversions")
ax.set_title("Credit per creative under each model (top campaigns)")
show("attribution_models", fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Bid funnel: win rate and clearing price against floor, by site and by country

# COMMAND ----------

bids = gold("bid_funnel_hourly")


def funnel_by(column):
    return (
        bids.groupBy(column)
        .agg(F.sum("bids").alias("bids"), F.sum("wins").alias("wins"),
             (F.sum(F.col("avg_floor_price") * F.col("bid_requests")) / F.sum("bid_requests")).cast("double").alias("floor"),
             (F.sum(F.col("avg_clearing_cpm") * F.col("wins")) / F.sum("wins") / 1000).cast("double").alias("clearing"))
        .withColumn("win_rate", F.col("wins") / F.col("bids"))
        .orderBy(column)
        .toPandas()
    )


funnel = {"website": funnel_by("website"), "country": funnel_by("country")}
fig, axes = plt.subplots(2, 2, figsize=(13, 8))
for row, (column, frame) in enumerate(funnel.items()):
    labels = frame[column].fillna("unknown")
    axes[row][0].bar(labels, frame["win_rate"])
    axes[row][0].set_title(f"win rate by {column}")
    axes[row][1].bar(labels, frame["floor"], label="avg floor price")
    axes[row][1].bar(labels, frame["clearing"], label="avg clearing price", alpha=0.6)
    axes[row][1].set_title(f"clearing price against floor by {column}")
    axes[row][1].legend(fontsize=7)
    for ax in axes[row]:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
fig.tight_layout()
show("bid_funnel", fig)
