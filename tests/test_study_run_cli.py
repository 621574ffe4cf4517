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
from flows.simulate import simulated_sites, simulation_keys
from shared.synthetic import generate_network

PROTOCOL = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"
FEDRWE = [sys.executable, "-m", "flows.cli"]


def fedrwe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDRWE, *args], capture_output=True, text=True, timeout=900, check=False)


def signed(root: Path) -> list[str]:
    """The options that make `fedrwe study run` sign with the simulated coordinator's key."""
    keys = simulation_keys(root / "sites")
    return ["--signing-key", str(keys.coordinator_key), "--site-keyring", str(keys.site_keyring)]


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Iterator[tuple[LocalNetwork, Path]]:
    root = tmp_path_factory.mktemp("net")
    generate_network(root / "data", n_sites=3, n_patients=9_000, seed=5)
    specs, _ = simulated_sites(root / "data" / "sites", root / "sites", "local[2]")
    # start_timeout_s: three Spark site services on a shared 2-core machine can take minutes
    with LocalNetwork(root / "run", specs, prefect_api_url=prefect_api_url, start_timeout_s=400) as net:
        yield net, root


@pytest.mark.integration
def test_study_run_writes_results(network: tuple[LocalNetwork, Path], prefect_api_url: str, tmp_path: Path) -> None:
    net, root = network
    assert net.pki is not None
    done = fedrwe("study", "run", str(PROTOCOL), "--superlink", net.superlink_address,
                  "--root-certificates", str(net.pki.ca_cert),
                  "--out", str(tmp_path), "--min-sites", "3", "--prefect-api-url", prefect_api_url, *signed(root))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["sites"]) == 3
    assert results["envelopes"]["signed"] is True  # requests signed, every site's reply verified
    assert sorted(results["envelopes"]["site_key_ids"]) == ["site_01", "site_02", "site_03"]
    assert {site: a["mode"] for site, a in results["site_approvals"].items()} == dict.fromkeys(
        ["site_01", "site_02", "site_03"], "auto"
    )
    for name in results["analyses"]:  # the estimates table, one row per analysis
        assert f" {name} " in done.stdout
    assert "results.json" in done.stdout
    assert f"rounds done: {len(results['rounds'])}" in done.stdout  # the live view's last drawing
    flow_run = results["orchestration"]["prefect_flow_run_id"]
    assert f"{prefect_api_url.removesuffix('/api')}/runs/flow-run/{flow_run}" in done.stdout
    status = fedrwe("study", "status", "--out", str(tmp_path), "--json", "--prefect-api-url", prefect_api_url)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["state"], shown["rounds_done"]) == ("complete", len(results["rounds"]))
    assert shown["sites"] == dict.fromkeys(["site_01", "site_02", "site_03"], "ok")
    assert shown["prefect_state"].startswith("Completed (ketamine_cud_anaesthesia (1 comparison) flower-run ")
    (tmp_path / "report.html").unlink()
    report = fedrwe("study", "report", results["study_id"], "--out", str(tmp_path))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.html").stat().st_size > 0


@pytest.mark.integration
def test_a_missing_table_is_named_with_its_site(network: tuple[LocalNetwork, Path], prefect_api_url: str, tmp_path: Path) -> None:
    """site_02 lost its `death` table: it answers with an error naming itself, the table and
    the fix; the study goes on without it (default quorum) and results.json says so."""
    net, root = network
    death = root / "data" / "sites" / "site_02" / "lake" / "death"
    shutil.move(death, root / "death.moved")
    try:
        assert net.pki is not None
        done = fedrwe("study", "run", str(PROTOCOL), "--superlink", net.superlink_address,
                      "--root-certificates", str(net.pki.ca_cert),
                      "--out", str(tmp_path), "--min-sites", "3", "--prefect-api-url", prefect_api_url, *signed(root))
    finally:
        shutil.move(root / "death.moved", death)
    assert done.returncode == 0, done.stderr
    participation = json.loads((tmp_path / "results.json").read_text())["participation"]
    assert participation["sites"] == ["site_01", "site_03"]
    [dropout] = participation["dropped"]
    assert (dropout["site_id"], dropout["status"]) == ("site_02", "error")
    assert "site 'site_02'" in dropout["reason"]
    assert "'death' is missing" in dropout["reason"]
    assert "Fix:" in dropout["reason"]


@pytest.mark.integration
def test_attack_a_study_from_an_untrusted_coordinator_is_refused(
    network: tuple[LocalNetwork, Path], prefect_api_url: str, tmp_path: Path
) -> None:
    """Anyone who reaches the SuperLink can submit a run: unsigned, or signed with a key of its
    own (`fedrwe keys new`), its requests are refused by every real site service, opaquely."""
    net, root = network
    made = fedrwe("keys", "new", "--owner", "coordinator", "--out", str(tmp_path / "intruder"))
    assert made.returncode == 0, made.stderr
    intruder = ["--signing-key", str(tmp_path / "intruder" / "coordinator.pem"),
                "--site-keyring", str(simulation_keys(root / "sites").site_keyring)]
    for keys in ([], intruder):
        assert net.pki is not None
        done = fedrwe("study", "run", str(PROTOCOL), "--superlink", net.superlink_address,
                      "--root-certificates", str(net.pki.ca_cert),
                      "--out", str(tmp_path / "out"), "--min-sites", "3", "--prefect-api-url", prefect_api_url, *keys)
        assert done.returncode == 2
        message = " ".join(done.stderr.split())
        assert "envelope rejected" in message
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out" / "results.json").exists()
    for site in ("site_01", "site_02", "site_03"):
        log = root / "sites" / site / "work" / "audit" / "releases.jsonl"
        decisions = [json.loads(line)["decision"] for line in log.read_text().splitlines()]
        assert decisions[-1] == "envelope rejected"


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
