"""The feed batches join a copy of the creatives dimension, read again once the dimension's own
query has merged a change."""
from __future__ import annotations

from chispa import assert_df_equality

from advertisex import parsing, pipeline
from conftest import settings_for



def creatives(spark, rows):
    return spark.createDataFrame(rows, parsing.ddl_schema("dim_creatives.ddl"))


def merge(spark, writer, batch_id: int, rows) -> None:
    writer(creatives(spark, rows), batch_id)


def test_the_copy_follows_the_dimension_queries_merges(spark, tmp_path):
    settings = settings_for(str(tmp_path / "landing"), str(tmp_path / "lake"))
    copy = pipeline.CreativesDimension(settings)
    assert copy.frame(spark).collect() == []  # no table yet: no creative
    writer = pipeline.DimCreativesWriter(settings, copy)
    first = [("cr-1", "cmp-1", "adv-1", "banner", 300, 250)]
    merge(spark, writer, 0, first)
    assert_df_equality(copy.frame(spark), creatives(spark, first), ignore_nullable=True)

    # Written behind the copy's back (not through the writer): the copy is not read again.
    pipeline.DimCreativesWriter(settings)(creatives(spark, [("cr-9", "cmp-9", "adv-9", "video", 1, 1)]), 1)
    assert_df_equality(copy.frame(spark), creatives(spark, first), ignore_nullable=True)

    merge(spark, writer, 2, [("cr-1", "cmp-2", "adv-2", "banner", 300, 250), ("cr-3", "cmp-3", "adv-3", "video", 640, 360)])
    expected = creatives(spark, [("cr-1", "cmp-2", "adv-2", "banner", 300, 250), ("cr-3", "cmp-3", "adv-3", "video", 640, 360),
                                 ("cr-9", "cmp-9", "adv-9", "video", 1, 1)])
    assert_df_equality(copy.frame(spark), expected, ignore_nullable=True, ignore_row_order=True)
