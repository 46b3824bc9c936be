"""One SparkSession for the whole test session, plus lakes built once and shared by tests."""
from __future__ import annotations

import os
import shutil

import pytest

TEST_KEY = "test-pseudonymization-key"
os.environ["ADVX_PSEUDONYMIZATION_KEY"] = TEST_KEY

from advertisex import pipeline  # noqa: E402
from advertisex.config import Settings, load_conf  # noqa: E402
from advertisex.generator import GeneratorOptions, generate  # noqa: E402
from advertisex.session import build_session  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "..", "shared", "contracts", "samples")
if not os.path.isdir(SAMPLES):
    SAMPLES = os.path.join(ROOT, "tests", "data", "samples")


def settings_for(landing: str, lake: str) -> Settings:
    return load_conf(os.path.join(ROOT, "conf", "test.yaml"), {"landing": landing, "lake": lake})


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    settings = settings_for(str(tmp_path_factory.mktemp("landing")), str(tmp_path_factory.mktemp("lake")))
    session = build_session(settings, "advertisex-tests")
    yield session
    session.stop()


def read_table(spark, settings: Settings, table: str):
    return spark.read.format("delta").load(settings.table(table))


def run_pipeline(spark, settings: Settings) -> None:
    pipeline.run(spark, settings, available_now=True)


@pytest.fixture(scope="session")
def samples_lake(spark, tmp_path_factory) -> Settings:
    """The contract samples, dropped as files and run through the pipeline once."""
    base = tmp_path_factory.mktemp("samples")
    landing = base / "landing"
    for feed, name in [("impressions", "impressions.jsonl"), ("clicks_conversions", "clicks_conversions.csv"),
                       ("bid_requests", "bid_requests.avro"), ("dims/creatives", "creatives.csv")]:
        (landing / feed).mkdir(parents=True)
        shutil.copy(os.path.join(SAMPLES, name), landing / feed / name)
    settings = settings_for(str(landing), str(base / "lake"))
    run_pipeline(spark, settings)
    return settings


GENERATED = GeneratorOptions(impressions=3000, seed=11, days=2, files_per_day=3, ctr=0.05, cvr=0.2)


@pytest.fixture(scope="session")
def generated_lake(spark, tmp_path_factory):
    """Generated drops (with every kind of bad record) run through the pipeline; (settings, manifest)."""
    base = tmp_path_factory.mktemp("generated")
    manifest = generate(str(base / "landing"), GENERATED, progress=False)
    settings = settings_for(str(base / "landing"), str(base / "lake"))
    run_pipeline(spark, settings)
    return settings, manifest
