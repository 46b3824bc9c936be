# Databricks notebook source
# MAGIC %md
# MAGIC # Ingestion quality
# MAGIC Where the records of each feed went: silver, quarantine (by rule) or dropped as duplicates,
# MAGIC per micro-batch, from `ops/metrics` and the quarantine tables. Set the `lake` widget (Databricks)
# MAGIC or the `ADVX_LAKE` environment variable (locally) to the lake's root.

# COMMAND ----------

import os

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from advertisex.notebook import lake_root

lake = lake_root(globals())
spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()

# COMMAND ----------

# MAGIC %md
# MAGIC ## Accounting per feed: rows in = silver + quarantined + duplicates

# COMMAND ----------

metrics = spark.read.format("delta").load(f"{lake}/ops/metrics").filter("feed != 'gold'")  # gold rows carry no accounting
accounting = (
    metrics.groupBy("feed")
    .agg(*[F.sum(c).alias(c) for c in ("rows_in", "rows_silver", "rows_quarantined", "duplicates_dropped")])
    .withColumn("balanced", F.col("rows_in") == F.col("rows_silver") + F.col("rows_quarantined") + F.col("duplicates_dropped"))
    .orderBy("feed")
)
accounting.show(truncate=False)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Quarantine by rule

# COMMAND ----------

for feed in ("impressions", "clicks_conversions", "bid_requests"):
    path = f"{lake}/quarantine/{feed}"
    if os.path.exists(path) or "://" in path:
        (spark.read.format("delta").load(path).select(F.explode("reasons").alias("rule"))
         .groupBy("rule").count().orderBy(F.desc("count")).show(truncate=False))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Micro-batches over time

# COMMAND ----------

metrics.select("feed", "batch_id", "batch_started_at", "duration_ms", "rows_in", "rows_quarantined",
               "duplicates_dropped").orderBy("batch_started_at").show(50, truncate=False)
