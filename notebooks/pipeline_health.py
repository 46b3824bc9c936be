# Databricks notebook source
# MAGIC %md
# MAGIC # Pipeline health
# MAGIC How the running pipeline is doing, from `ops/metrics` (one row per micro-batch per query) and
# MAGIC `ops/alerts` (one row each time an alert fires or resolves): input rates, event-time lag,
# MAGIC quarantine ratio per feed, and the alerts over time.
# MAGIC
# MAGIC Set the `lake` widget (Databricks) or the `ADVX_LAKE` environment variable (locally) to the
# MAGIC lake's root. Locally the figures are also saved as PNG files under `ADVX_FIGURES`
# MAGIC (default `data/figures`).

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
figures = Figures(globals())
show = figures.show


def ops(name):
    return spark.read.format("delta").load(f"{lake}/ops/{name}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Per feed and micro-batch: input rate, event-time lag, quarantine ratio
# MAGIC The rate is the batch's records over the time since the feed's previous batch started (batch
# MAGIC sizes follow the trigger; rates do not). The lag is the batch start minus its newest valid event.

# COMMAND ----------

per_batch = (
    ops("metrics").filter("feed != 'gold'")  # the correlation query's rows carry no feed accounting
    .select(
        "feed", "batch_started_at", "rows_in", "rows_quarantined",
        (F.col("batch_started_at").cast("double") - F.col("max_event_time").cast("double")).alias("lag_seconds"),
        F.when(F.col("rows_in") > 0, F.col("rows_quarantined") / F.col("rows_in")).alias("quarantine_ratio"),
    )
    .orderBy("feed", "batch_started_at")
    .toPandas()  # one row per micro-batch: small, and what matplotlib needs
)
per_batch["seconds"] = per_batch.groupby("feed")["batch_started_at"].diff().dt.total_seconds()
per_batch["rows_per_second"] = per_batch["rows_in"] / per_batch["seconds"]

fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
for feed, rows in per_batch.groupby("feed"):
    axes[0].plot(rows["batch_started_at"], rows["rows_per_second"], marker=".", label=feed)
    axes[1].plot(rows["batch_started_at"], rows["lag_seconds"] / 60, marker=".", label=feed)
    axes[2].plot(rows["batch_started_at"], rows["quarantine_ratio"] * 100, marker=".", label=feed)
axes[0].set_ylabel("records / s")
axes[1].set_ylabel("event-time lag (min)")
axes[2].set_ylabel("quarantined (%)")
axes[0].legend()
fig.suptitle("Feeds per micro-batch")
show("health_feeds", fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Quarantine by rule, per feed

# COMMAND ----------

by_rule = (
    ops("metrics").filter("feed != 'gold'")
    .select("feed", F.explode("quarantine_by_rule").alias("rule", "records"))
    .groupBy("feed", "rule").agg(F.sum("records").alias("records"))
    .orderBy("feed", F.desc("records"))
)
by_rule.show(truncate=False)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Alerts over time
# MAGIC Each bar spans an alert from firing to resolved (still open: up to now). Grouped by rule.

# COMMAND ----------

alerts = (
    ops("alerts")
    .groupBy("alert_id", "rule", "severity", "feed", "campaign_id")
    .agg(F.min("started_at").alias("started_at"),
         F.max(F.when(F.col("status") == "resolved", F.col("changed_at"))).alias("resolved_at"))
    .orderBy("started_at")
    .toPandas()
)
open_alerts = alerts[alerts["resolved_at"].isna()]
print(f"{len(alerts)} alerts, {len(open_alerts)} still open")
if not open_alerts.empty:
    print(open_alerts[["rule", "severity", "feed", "campaign_id", "started_at"]].to_string(index=False))

fig, ax = plt.subplots(figsize=(12, max(2.5, 0.35 * max(1, alerts["rule"].nunique()))))
if not alerts.empty:
    end = alerts["resolved_at"].fillna(alerts[["started_at", "resolved_at"]].max().max())
    rules = sorted(alerts["rule"].unique())
    colours = {"critical": "tab:red", "warning": "tab:orange"}
    for _, alert in alerts.assign(end=end).iterrows():
        ax.barh(rules.index(alert["rule"]), (alert["end"] - alert["started_at"]).total_seconds() / 86400,
                left=alert["started_at"], color=colours.get(alert["severity"], "tab:grey"), height=0.6)
    ax.set_yticks(range(len(rules)), rules)
ax.set_title("Alerts (red: critical, orange: warning)")
show("health_alerts", fig)
