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


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 for the whole test session."""
    import subprocess
    import time

    import httpx
    import psutil

    from flows.localnet import base_env, executable, free_port, log_tail, stop_trees

    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    log_path = home / "server.log"
    env = {**base_env(), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start:\n{log_tail(log_path)}")
            time.sleep(0.2)
        yield url
    finally:
        stop_trees([psutil.Process(server.pid)])
