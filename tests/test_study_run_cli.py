"""`fedrwe study run` against a running network (the real-deployment path), and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.localnet import LocalNetwork
from flows.simulate import simulated_sites
from shared.synthetic import generate_network

PROTOCOL = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"
FEDRWE = [sys.executable, "-m", "flows.cli"]


def fedrwe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDRWE, *args], capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Iterator[tuple[LocalNetwork, Path]]:
    root = tmp_path_factory.mktemp("net")
    generate_network(root / "data", n_sites=3, n_patients=9_000, seed=5)
    specs, _ = simulated_sites(root / "data" / "sites", root / "sites", "local[2]")
    with LocalNetwork(root / "run", specs, prefect_api_url=prefect_api_url) as net:
        yield net, root


@pytest.mark.integration
def test_study_run_writes_results(network: tuple[LocalNetwork, Path], prefect_api_url: str, tmp_path: Path) -> None:
    net, _ = network
    assert net.pki is not None
    done = fedrwe("study", "run", str(PROTOCOL), "--superlink", net.superlink_address,
                  "--root-certificates", str(net.pki.ca_cert),
                  "--out", str(tmp_path), "--min-sites", "3", "--prefect-api-url", prefect_api_url)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["sites"]) == 3
    for name in results["analyses"]:  # the estimates table, one row per analysis
        assert f" {name} " in done.stdout
    assert "results.json" in done.stdout


@pytest.mark.integration
def test_a_missing_table_is_named_with_its_site(network: tuple[LocalNetwork, Path], prefect_api_url: str, tmp_path: Path) -> None:
    net, root = network
    death = root / "data" / "sites" / "site_02" / "lake" / "death"
    shutil.move(death, root / "death.moved")
    try:
        assert net.pki is not None
        done = fedrwe("study", "run", str(PROTOCOL), "--superlink", net.superlink_address,
                      "--root-certificates", str(net.pki.ca_cert),
                      "--out", str(tmp_path), "--min-sites", "3", "--prefect-api-url", prefect_api_url)
    finally:
        shutil.move(root / "death.moved", death)
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "site 'site_02'" in message
    assert "'death' is missing" in message
    assert "Traceback" not in done.stderr


def test_a_mistyped_protocol_field_is_named(tmp_path: Path) -> None:
    text = PROTOCOL.read_text().replace("washout_days:", "washout_dayz:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    done = fedrwe("protocol", "check", str(bad))
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "washout_dayz" in message
    assert "Traceback" not in done.stderr
    done = fedrwe("study", "run", str(bad), "--superlink", "127.0.0.1:1", "--out", str(tmp_path),
                  "--prefect-api-url", "http://127.0.0.1:1/api")
    assert done.returncode == 2
    assert "washout_dayz" in " ".join(done.stderr.split())


def test_a_study_run_never_falls_back_to_plain_http_silently(tmp_path: Path) -> None:
    done = fedrwe("study", "run", str(PROTOCOL), "--superlink", "127.0.0.1:1", "--out", str(tmp_path),
                  "--prefect-api-url", "http://127.0.0.1:1/api")
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "--root-certificates" in message
    assert "--insecure" in message
    assert not (tmp_path / "run" / "flwr_home" / "config.toml").exists()  # nothing was dialled
