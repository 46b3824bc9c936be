"""The Avro file reader's screening: a file that is not a whole container skips spark-avro."""
from __future__ import annotations

import os
import shutil

import fastavro
import pytest

from advertisex import sources
from conftest import SAMPLES


@pytest.fixture(scope="module")
def avro_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("avro")
    good = folder / "good.avro"
    shutil.copy(os.path.join(SAMPLES, "bid_requests.avro"), good)
    content = good.read_bytes()
    (folder / "truncated.avro").write_bytes(content[: len(content) - 40])
    (folder / "garbage.avro").write_bytes(bytes(range(256)) * 2)
    (folder / "empty.avro").write_bytes(b"")
    return folder


def test_only_whole_containers_pass_the_screen(avro_files):
    verdicts = {name: sources.avro_container_is_whole(f"file:{avro_files / name}")
                for name in ("good.avro", "truncated.avro", "garbage.avro", "empty.avro", "missing.avro")}
    assert verdicts == {"good.avro": True, "truncated.avro": False, "garbage.avro": False, "empty.avro": False,
                        "missing.avro": None}
    assert sources.avro_container_is_whole(str(avro_files / "good.avro")) is True


def test_screened_read_salvages_broken_files_and_reads_the_rest(spark, avro_files):
    with open(avro_files / "good.avro", "rb") as fh:
        expected_ids = sorted(record["auction_id"] for record in fastavro.reader(fh))
    paths = [f"file:{avro_files / name}" for name in ("good.avro", "truncated.avro", "garbage.avro")]
    rows = sources.read_avro_files_screened(spark, paths).select("record.auction_id", "source", "raw").collect()
    by_file: dict[str, list] = {}
    for row in rows:
        by_file.setdefault(os.path.basename(row["source"]), []).append(row)
    assert sorted(r["auction_id"] for r in by_file["good.avro"]) == expected_ids
    # The truncated copy has a single block, cut short: nothing in it decodes, one row keeps its bytes.
    assert [(r["auction_id"], len(r["raw"]) > 0) for r in by_file["truncated.avro"]] == [(None, True)]
    assert [(r["auction_id"], bytes(r["raw"])) for r in by_file["garbage.avro"]] == [(None, bytes(range(256)) * 2)]
