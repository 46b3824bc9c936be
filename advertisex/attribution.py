"""Attribution, SPEC §3: which impression a click belongs to, which touch a conversion, which
bid request an impression won.

It works in two halves:
- **Candidates.** The joins that find every event a click, conversion or impression *could*
  belong to, in one narrow shape (``CANDIDATE_COLUMNS``). The same functions run on batch frames
  (the backfill) and on watermarked streams (the streaming correlation query), so both paths
  join on identical conditions. On a stream they are stream-stream joins, and their state holds
  only the few columns listed here.
- **Resolution.** From the events and *all* their candidates, the one answer SPEC gives: the
  latest candidate wins, IVT never takes part, and the fallbacks apply. This is always a batch
  step, because "latest" and "none" are only known once every candidate of an event is in. A
  join emits every candidate (a click with two impressions in its window gives two rows).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from advertisex.config import parse_interval

CANDIDATE_COLUMNS = ["kind", "event_id", "event_date", "campaign_id", "match_id", "match_time", "match_cost"]
# Candidate frames also carry the event's ``event_time`` (the streaming query derives the hours a
# batch changes from it); the candidates table keeps CANDIDATE_COLUMNS alone.
CLICK_BY_ID, CLICK_BY_WINDOW = "click_by_id", "click_by_window"
CONVERSION_CLICK, CONVERSION_VIEW, WIN = "conversion_click", "conversion_view", "win"


@dataclass(frozen=True)
class Windows:
    """The correlation windows of SPEC §3, as Spark interval strings ('30 minutes')."""

    click: str = "30 minutes"
    conversion_click: str = "24 hours"
    conversion_view: str = "1 hour"
    bid_request: str = "5 minutes"
    repeat_click: str = "10 seconds"
    # A stream cannot wait forever for the impression a click names: this is how long before and
    # after the click the stream keeps looking for it. The backfill looks without a bound.
    named_impression_before_click: str = "24 hours"
    named_impression_after_click: str = "1 hour"
    half_life: str = "24 hours"

    @classmethod
    def from_conf(cls, conf: dict) -> Windows:
        return cls(**{name: str(value) for name, value in conf["correlation"]["windows"].items()})

    def lookback(self) -> dt.timedelta:
        """How far before a date the events that can explain it may lie (a click's impression,
        a conversion's click and that click's impression)."""
        return max(
            parse_interval(self.conversion_click)
            + max(parse_interval(self.click), parse_interval(self.named_impression_before_click)),
            parse_interval(self.conversion_view),
        )


    def lookahead(self) -> dt.timedelta:
        """How far after a date the events that decide it may lie: the impression that makes a
        bid a win, the impression a click names (a click before it is IVT)."""
        return max(parse_interval(self.bid_request), parse_interval(self.named_impression_after_click))


def interval(text: str) -> Column:
    return F.expr(f"INTERVAL {text}")


# -- candidates ---------------------------------------------------------------------------------

def _counted(df: DataFrame) -> DataFrame:
    return df.filter(~F.col("is_ivt"))


def _impression_side(impressions: DataFrame, watermark: str | None) -> DataFrame:
    side = _counted(impressions).select(
        F.col("impression_id").alias("i_id"),
        F.col("event_time").alias("i_time"),
        F.col("user_key").alias("i_user"),
        F.col("campaign_id").alias("i_campaign"),
        F.col("cost").alias("i_cost"),
        F.col("auction_id").alias("i_auction"),
    )
    return side.withWatermark("i_time", watermark) if watermark else side


def _event_side(events: DataFrame, watermark: str | None, *extra: str) -> DataFrame:
    side = _counted(events).select(
        F.col("event_id").alias("e_id"),
        F.col("event_time").alias("e_time"),
        F.col("event_date").alias("e_date"),
        F.col("campaign_id").alias("e_campaign"),
        F.col("user_key").alias("e_user"),
        *extra,
    )
    return side.withWatermark("e_time", watermark) if watermark else side


def _candidates(joined: DataFrame, kind: str, match_id: str, match_time: str, match_cost: Column | None = None) -> DataFrame:
    return joined.select(
        F.lit(kind).alias("kind"),
        F.col("e_id").alias("event_id"),
        F.col("e_date").alias("event_date"),
        F.col("e_campaign").alias("campaign_id"),
        F.col(match_id).alias("match_id"),
        F.col(match_time).alias("match_time"),
        (match_cost if match_cost is not None else F.lit(None)).cast("decimal(18,6)").alias("match_cost"),
        F.col("e_time").alias("event_time"),
    )


def click_candidates(clicks: DataFrame, impressions: DataFrame, windows: Windows,
                     watermark: str | None = None, bounded: bool = False) -> DataFrame:
    """Impressions a click may belong to: the one it names, and those in its window.

    ``bounded`` limits the named-impression join in time, which a stream needs to evict state.
    """
    c = _event_side(clicks, watermark, F.col("impression_id").alias("e_impression"))
    i = _impression_side(impressions, watermark)
    named = c["e_impression"] == i["i_id"]
    if bounded:
        named = named & c["e_time"].between(
            i["i_time"] - interval(windows.named_impression_after_click),
            i["i_time"] + interval(windows.named_impression_before_click),
        )
    by_id = _candidates(c.join(i, on=named, how="inner"), CLICK_BY_ID, "i_id", "i_time")
    c2 = _event_side(clicks, watermark)
    i2 = _impression_side(impressions, watermark)
    in_window = (
        (c2["e_user"] == i2["i_user"]) & (c2["e_campaign"] == i2["i_campaign"])
        & c2["e_time"].between(i2["i_time"], i2["i_time"] + interval(windows.click))
    )
    by_window = _candidates(c2.join(i2, on=in_window, how="inner"), CLICK_BY_WINDOW, "i_id", "i_time")
    return by_id.unionByName(by_window)


def conversion_candidates(conversions: DataFrame, clicks: DataFrame, impressions: DataFrame, windows: Windows,
                          watermark: str | None = None) -> DataFrame:
    """Clicks (24 h before) and impressions (1 h before) of the same user and campaign."""
    v = _event_side(conversions, watermark)
    k = _event_side(clicks, watermark).select(
        F.col("e_id").alias("k_id"), F.col("e_time").alias("k_time"),
        F.col("e_user").alias("k_user"), F.col("e_campaign").alias("k_campaign"),
    )
    by_click = (
        (v["e_user"] == k["k_user"]) & (v["e_campaign"] == k["k_campaign"])
        & v["e_time"].between(k["k_time"], k["k_time"] + interval(windows.conversion_click))
    )
    v2 = _event_side(conversions, watermark)
    i = _impression_side(impressions, watermark)
    by_view = (
        (v2["e_user"] == i["i_user"]) & (v2["e_campaign"] == i["i_campaign"])
        & v2["e_time"].between(i["i_time"], i["i_time"] + interval(windows.conversion_view))
    )
    return (
        _candidates(v.join(k, on=by_click, how="inner"), CONVERSION_CLICK, "k_id", "k_time")
        .unionByName(_candidates(v2.join(i, on=by_view, how="inner"), CONVERSION_VIEW, "i_id", "i_time"))
    )


def win_candidates(bid_requests: DataFrame, impressions: DataFrame, windows: Windows, watermark: str | None = None) -> DataFrame:
    """Impressions that won a bid request: same auction_id, at most ``bid_request`` after it."""
    b = _counted(bid_requests).filter(F.col("has_bid")).select(
        F.col("auction_id").alias("e_id"),
        F.col("event_time").alias("e_time"),
        F.col("event_date").alias("e_date"),
        F.col("bid_campaign_id").alias("e_campaign"),
    )
    if watermark:
        b = b.withWatermark("e_time", watermark)
    i = _impression_side(impressions, watermark)
    won = (b["e_id"] == i["i_auction"]) & i["i_time"].between(b["e_time"], b["e_time"] + interval(windows.bid_request))
    return _candidates(b.join(i, on=won, how="inner"), WIN, "i_id", "i_time", F.col("i_cost"))


def all_candidates(silver: dict[str, DataFrame], windows: Windows) -> DataFrame:
    """Every candidate among batch frames of silver tables (the backfill's path)."""
    return (
        click_candidates(silver["clicks"], silver["impressions"], windows)
        .unionByName(conversion_candidates(silver["conversions"], silver["clicks"], silver["impressions"], windows))
        .unionByName(win_candidates(silver["bid_requests"], silver["impressions"], windows))
    )


# -- resolution ---------------------------------------------------------------------------------

def _latest(candidates: DataFrame, kind: str, prefix: str) -> DataFrame:
    """Per event, the candidate with the latest match_time (then the greatest id, so ties are stable)."""
    return (
        candidates.filter(F.col("kind") == kind)
        .groupBy("event_id")
        .agg(F.max_by(F.struct("match_id", "match_time", "match_cost"), F.struct("match_time", "match_id")).alias("m"))
        .select(
            F.col("event_id").alias(f"{prefix}_event_id"),
            F.col("m.match_id").alias(f"{prefix}_id"),
            F.col("m.match_time").alias(f"{prefix}_time"),
            F.col("m.match_cost").alias(f"{prefix}_cost"),
        )
    )


def resolve_clicks(clicks: DataFrame, candidates: DataFrame, windows: Windows) -> DataFrame:
    """Every silver click with its impression, ``match_type`` and final IVT verdict.

    On top of silver's own IVT, a click is ``click_before_impression`` when the impression it
    names is later than the click, and ``repeat_click`` when the same user clicked the same
    impression less than ``repeat_click`` before (the first click counts).
    """
    named = _latest(candidates, CLICK_BY_ID, "named")
    window = _latest(candidates, CLICK_BY_WINDOW, "win")
    on_id = F.col("named_time") <= F.col("event_time")
    resolved = (
        clicks.join(named, on=clicks["event_id"] == named["named_event_id"], how="left")
        .join(window, on=clicks["event_id"] == window["win_event_id"], how="left")
        .withColumn("match_type", F.when(on_id, F.lit("impression_id"))
                    .when(F.col("win_id").isNotNull(), F.lit("window")).otherwise(F.lit("none")))
        .withColumn("matched_impression_id", F.when(on_id, F.col("named_id")).otherwise(F.col("win_id")))
        .withColumn("impression_time", F.when(on_id, F.col("named_time")).otherwise(F.col("win_time")))
        .withColumn("ivt_reason", F.when(F.col("is_ivt"), F.col("ivt_reason"))
                    .when(F.col("named_time") > F.col("event_time"), F.lit("click_before_impression")))
    )
    clicked = F.coalesce(F.col("matched_impression_id"), F.col("impression_id"))
    earlier = Window.partitionBy("user_key", clicked, F.col("ivt_reason").isNull()).orderBy("event_time", "event_id")
    previous = F.lag("event_time").over(earlier)
    repeat = (
        F.col("ivt_reason").isNull() & clicked.isNotNull() & previous.isNotNull()
        & (F.col("event_time") <= previous + interval(windows.repeat_click))
    )
    return (
        resolved.withColumn("ivt_reason", F.when(repeat, F.lit("repeat_click")).otherwise(F.col("ivt_reason")))
        .withColumn("is_ivt", F.col("ivt_reason").isNotNull())
        .withColumn("match_type", F.when(F.col("is_ivt"), F.lit(None)).otherwise(F.col("match_type")))
        .withColumn("matched_impression_id", F.when(F.col("is_ivt"), F.lit(None)).otherwise(F.col("matched_impression_id")))
        .withColumn("impression_time", F.when(F.col("is_ivt"), F.lit(None)).otherwise(F.col("impression_time")))
        .drop("named_event_id", "named_id", "named_time", "named_cost", "win_event_id", "win_id", "win_time", "win_cost")
    )


def resolve_conversions(conversions: DataFrame, candidates: DataFrame, resolved_clicks: DataFrame) -> DataFrame:
    """Every silver conversion with its ``touch`` (click, view or none), click, and impression
    (``touch_impression_id`` and ``touch_impression_time``).

    Only counted clicks are touches, so the click candidates are checked against the clicks'
    final IVT verdict; ``resolved_clicks`` must hold every click the conversions' candidates name
    (the conversion window before them, or just those clicks' hours: ``gold.click_hours``).
    """
    counted = resolved_clicks.filter(~F.col("is_ivt")).select(
        F.col("event_id").alias("counted_click_id"), F.col("matched_impression_id").alias("click_impression_id"),
        F.col("impression_time").alias("click_impression_time"))
    click_candidates_ = (
        candidates.filter(F.col("kind") == CONVERSION_CLICK)
        .join(counted, on=F.col("match_id") == F.col("counted_click_id"), how="inner")
        .withColumn("match_cost", F.lit(None).cast("decimal(18,6)"))
    )
    clicks_ = (
        click_candidates_.groupBy("event_id")
        .agg(F.max_by(F.struct("match_id", "match_time", "click_impression_id", "click_impression_time"),
                      F.struct("match_time", "match_id")).alias("m"))
        .select(F.col("event_id").alias("click_event_id"), F.col("m.match_id").alias("touch_click_id"),
                F.col("m.click_impression_id").alias("touch_click_impression_id"),
                F.col("m.click_impression_time").alias("touch_click_impression_time"))
    )
    views = _latest(candidates, CONVERSION_VIEW, "view")
    has_click = F.col("touch_click_id").isNotNull()
    counted_conversion = ~F.col("is_ivt")
    return (
        conversions.join(clicks_, on=conversions["event_id"] == clicks_["click_event_id"], how="left")
        .join(views, on=conversions["event_id"] == views["view_event_id"], how="left")
        .withColumn("touch", F.when(~counted_conversion, F.lit(None)).when(has_click, F.lit("click"))
                    .when(F.col("view_id").isNotNull(), F.lit("view")).otherwise(F.lit("none")))
        .withColumn("click_id", F.when(F.col("touch") == "click", F.col("touch_click_id")))
        .withColumn("touch_impression_id", F.when(F.col("touch") == "click", F.col("touch_click_impression_id"))
                    .when(F.col("touch") == "view", F.col("view_id")))
        .withColumn("touch_impression_time", F.when(F.col("touch") == "click", F.col("touch_click_impression_time"))
                    .when(F.col("touch") == "view", F.col("view_time")))
        .drop("click_event_id", "touch_click_id", "touch_click_impression_id", "touch_click_impression_time",
              "view_event_id", "view_id", "view_time", "view_cost")
    )


def resolve_wins(bid_requests: DataFrame, candidates: DataFrame) -> DataFrame:
    """Every silver bid request with ``won`` and the clearing price of the impression that won it."""
    wins = _latest(candidates, WIN, "win")
    won = F.col("win_id").isNotNull() & F.col("has_bid") & ~F.col("is_ivt")
    return (
        bid_requests.join(wins, on=bid_requests["auction_id"] == wins["win_event_id"], how="left")
        .withColumn("won", won)
        .withColumn("clearing_price", F.when(won, F.col("win_cost")))
        .drop("win_event_id", "win_id", "win_time", "win_cost")
    )


# -- multi-touch --------------------------------------------------------------------------------

MODELS = ["first_touch", "last_touch", "linear", "time_decay", "position_based"]


def with_touch_credits(touches: DataFrame, half_life: str) -> DataFrame:
    """Credit of each touch of a conversion under every model; one row per touch and model.

    ``touches``: conversion_id, conversion_time, touch_time, touch_id and the touch's attributes.
    Touches are ordered by time (then id); each model's credits of a conversion sum to 1.
    """
    ordered = Window.partitionBy("conversion_id").orderBy("touch_time", "touch_id")
    whole = Window.partitionBy("conversion_id")
    half_life_seconds = parse_interval(half_life).total_seconds()
    age = F.col("conversion_time").cast("double") - F.col("touch_time").cast("double")
    decay = F.pow(F.lit(2.0), -age / F.lit(half_life_seconds))
    n, pos = F.col("_n"), F.col("_pos")
    position_based = (
        F.when(n == 1, F.lit(1.0))
        .when(n == 2, F.lit(0.5))
        .when((pos == 1) | (pos == n), F.lit(0.4))
        .otherwise(F.lit(0.2) / (n - 2))
    )
    credits = (
        touches.withColumn("_pos", F.row_number().over(ordered))
        .withColumn("_n", F.count(F.lit(1)).over(whole))
        .withColumn("_decay", decay)
        .withColumn("_decay_sum", F.sum("_decay").over(whole))
        .withColumn("credits", F.array(
            F.struct(F.lit("first_touch").alias("model"), F.when(pos == 1, 1.0).otherwise(0.0).alias("credit")),
            F.struct(F.lit("last_touch").alias("model"), F.when(pos == n, 1.0).otherwise(0.0).alias("credit")),
            F.struct(F.lit("linear").alias("model"), (F.lit(1.0) / n).alias("credit")),
            F.struct(F.lit("time_decay").alias("model"), (F.col("_decay") / F.col("_decay_sum")).alias("credit")),
            F.struct(F.lit("position_based").alias("model"), position_based.cast("double").alias("credit")),
        ))
        .withColumn("c", F.explode("credits"))
        .withColumn("model", F.col("c.model"))
        .withColumn("credit", F.col("c.credit"))
    )
    return credits.drop("_pos", "_n", "_decay", "_decay_sum", "credits", "c")
