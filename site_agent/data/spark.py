"""The site's one SparkSession."""

from __future__ import annotations

import shutil

from pyspark.sql import SparkSession

from shared.errors import DataError
from site_agent.settings import SparkSettings


def require_java() -> None:
    """Fail with the exact fix when no Java runtime is on PATH (Spark needs one)."""
    if shutil.which("java") is None:
        raise DataError(
            "Spark needs a Java runtime and `java` is not on PATH. Fix: install one, e.g. "
            "`sudo apt-get install -y openjdk-17-jre-headless`, or set JAVA_HOME and PATH."
        )


def start_spark(settings: SparkSettings, app_name: str) -> SparkSession:
    """Start the session: UTC dates, ANSI SQL, no UI, quiet logs; loopback-only when local."""
    require_java()
    builder = (
        SparkSession.builder.appName(app_name)
        .master(settings.master)
        .config("spark.driver.memory", settings.driver_memory)
        .config("spark.sql.shuffle.partitions", str(settings.shuffle_partitions))
    )
    if settings.master.startswith("local"):  # a cluster's executors must reach the driver
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    spark = (
        builder.config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.ansi.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark
