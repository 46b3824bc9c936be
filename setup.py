from setuptools import find_packages, setup

# pyspark and delta-spark are pinned as a pair: delta-spark 4.3.1 is built for Spark 4.1, and its
# jar (pom.xml) must match. Spark 4.2's Delta and Avro jars are not on Maven Central yet.
setup(
    name="advertisex-lakehouse",
    version="0.1.0",
    description="AdvertiseX ad-event lakehouse: streaming ingestion, attribution and campaign metrics on Delta Lake",
    packages=find_packages(include=["advertisex", "advertisex.*"]),
    python_requires=">=3.10",
    install_requires=[
        "pyspark==4.1.1",
        "delta-spark==4.3.1",
        "pyarrow==26.0.1",
        "pandas==3.1.1",
        "fastavro==1.13.1",
        "pyyaml==6.0.3",
        "tqdm==4.70.1",
        "crawlerdetect==0.4.2",
        "user-agents-ng==3.0.0",
        "ua-parser==1.0.2",
        "ua-parser-builtins==202610",
        "ua-parser-rs==0.1.5",
        "iptocc==3.3.170",
        "confluent-kafka==2.16.1",
        "prometheus-client==0.26.0",
    ],
    extras_require={
        "notebooks": ["matplotlib==3.11.2"],
        "dev": ["pytest==9.2.0", "chispa==0.12.0", "ruff", "matplotlib==3.11.2"],
    },
)
