"""Shared fixtures: one real local SparkSession for the whole test run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pyspark.sql import SparkSession

from site_agent.data.spark import start_spark
from site_agent.settings import SparkSettings


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    session = start_spark(SparkSettings(master="local[2]", shuffle_partitions=4), "fedrwe-tests")
    yield session
    session.stop()
