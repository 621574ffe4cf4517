"""Fault injection on real processes: signals to site services, SuperNodes and the ServerApp.

One simulated network (Prefect server, TLS SuperLink, 3 SuperNodes, 3 Spark site services,
signed envelopes) runs the study several times; each run injects one fault with a real
signal at a point chosen by watching the coordinator's journal, and checks that the study
survives: a killed coordinator resumes to the uninterrupted run's results, a site that
stops and comes back is retried into the same results, a killed site is left out with the
fit restarted on the others (equal to the pooled rows of those sites), a killed SuperNode
likewise. docs/reliability.md tabulates them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w
from deltalake import DeltaTable

from coordinator.results import stable_differences, stable_view
from flows.localnet import LocalNetwork
from flows.simulate import simulated_sites, simulation_keys
from flows.submit import resume_run_config, study_run_config
from shared.errors import TransportError
from shared.protocol.model import load_protocol
from shared.synthetic import generate_network
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled

PROTOCOL_PATH = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"
PROTOCOL = load_protocol(PROTOCOL_PATH)
ROUND_TIMEOUT_S = 20.0  # rounds take 1-3 s once the cohorts are built (the first, clean run)


class Network:
    """The running network and the study runs made on it."""

    def __init__(self, net: LocalNetwork, root: Path) -> None:
        self.net = net
        self.root = root
        self.keys = simulation_keys(root / "sites").run_config()
        self.clean: dict[str, Any] = {}

    def config(self, out: Path, timeout_s: float = ROUND_TIMEOUT_S) -> dict[str, Any]:
        return study_run_config(PROTOCOL_PATH, out, **self.keys, **{"round-timeout-s": timeout_s})

    def run(self, out: Path, during: Callable[[Path], None] | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the study into ``out``; ``during(out)`` runs meanwhile (the fault). Returns
        results.json, or raises the run's error."""
        failure: list[BaseException] = []

        def submit() -> None:
            try:
                self.net.submit_run(config or self.config(out), timeout_s=900)
            except BaseException as error:  # handed to the test thread
                failure.append(error)

        worker = threading.Thread(target=submit)
        worker.start()
        try:
            if during is not None:
                during(out)
        finally:
            worker.join()
        if failure:
            raise failure[0]
        return dict(json.loads((out / "results.json").read_text(encoding="utf-8")))

    def pooled(self, sites: list[str]) -> pd.DataFrame:
        return pd.concat(
            DeltaTable(str(self.root / "sites" / site / "work" / "studies" / PROTOCOL.study_id / "analysis_dataset")).to_pandas()
            for site in sites
        )


def wait_for_round(out: Path, index: int, timeout_s: float = 300.0) -> None:
    """Block until the coordinator journaled round ``index`` of the run in ``out``."""
    deadline = time.monotonic() + timeout_s
    while not (out / "journal" / f"{index:04d}.json").exists():
        assert time.monotonic() < deadline, f"round {index} was never journaled in {out}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("faults")
    generate_network(root / "data", n_sites=3, n_patients=4_000, seed=11)
    specs, _ = simulated_sites(root / "data" / "sites", root / "sites", "local[1]", "768m")
    for settings in (root / "sites").glob("*/site.toml"):  # small sites: counts from 3 may leave
        config = tomllib.loads(settings.read_text(encoding="utf-8"))
        config["policy"]["min_cell_count"] = 3
        settings.write_text(tomli_w.dumps(config), encoding="utf-8")
    with LocalNetwork(root / "run", specs, prefect_api_url=prefect_api_url) as net:
        network = Network(net, root)
        # the default round timeout here: the first round builds every site's cohort
        network.clean = network.run(root / "clean", config=network.config(root / "clean", timeout_s=3600.0))
        yield network


def _stable(results: dict[str, Any]) -> str:
    return json.dumps(stable_view(results), sort_keys=True)


@pytest.mark.integration
def test_the_clean_run_uses_every_site(network: Network) -> None:
    assert network.clean["participation"] == {
        "sites": ["site_01", "site_02", "site_03"], "attempts": 1, "dropped": [],
        "note": "every analysis of this comparison uses exactly these sites"}
    assert_crude_equals_pooled(network.clean["analyses"]["crude"], network.pooled(["site_01", "site_02", "site_03"]))


@pytest.mark.integration
@pytest.mark.parametrize("after_round", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_a_killed_coordinator_resumes_to_the_uninterrupted_results(network: Network, tmp_path: Path, after_round: int) -> None:
    """SIGKILL the ServerApp once round ``after_round`` is journaled; `fedrwe study resume`'s
    run config then finishes the run: byte-identical to the clean run but for ids and clocks."""
    def kill_coordinator(out: Path) -> None:
        wait_for_round(out, after_round)
        pids = network.net.serverapp_pids()
        assert pids, "no ServerApp process to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(TransportError, match="ended as 'finished:failed'"):
        network.run(tmp_path, kill_coordinator)
    assert not (tmp_path / "results.json").exists()
    journaled = len(list((tmp_path / "journal").glob("[0-9]*.json")))
    assert journaled >= after_round
    # what `fedrwe study resume ketamine_cud_anaesthesia --out DIR` submits
    config = resume_run_config(PROTOCOL.study_id, tmp_path)
    assert config["resume"] == "true"
    resumed = network.run(tmp_path, config=config)
    assert resumed["orchestration"]["rounds_replayed"] == journaled
    assert resumed["run_id"] == json.loads((tmp_path / "journal" / "run.json").read_text())["run_id"]
    assert stable_differences(resumed, network.clean) == []
    assert _stable(resumed) == _stable(network.clean)


@pytest.mark.integration
@pytest.mark.slow
def test_a_site_that_stops_answering_and_comes_back_is_retried_into_the_same_results(network: Network, tmp_path: Path) -> None:
    """SIGSTOP site_02's service (and its Spark JVM) for longer than a round's timeout, then
    SIGCONT: Prefect's retry of the round resends the same signed request, the site answers
    (from its cache when it had computed), nobody drops out."""
    def pause_site(out: Path) -> None:
        wait_for_round(out, 1)
        network.net.signal_process("site_02-service", signal.SIGSTOP)
        time.sleep(ROUND_TIMEOUT_S + 4)
        network.net.signal_process("site_02-service", signal.SIGCONT)

    results = network.run(tmp_path, pause_site)
    assert results["participation"]["dropped"] == []
    assert stable_differences(results, network.clean) == []
    assert _stable(results) == _stable(network.clean)


@pytest.mark.integration
def test_a_killed_site_is_left_out_and_the_fit_restarts_on_the_others(network: Network, tmp_path: Path) -> None:
    """SIGKILL site_03's service (with its JVM) after round 2: its ClientApp cannot reach it, the
    round is retried, then the comparison restarts on site_01 and site_02; every estimate
    equals those two sites' pooled rows. The site then comes back for the next run."""
    def kill_site(out: Path) -> None:
        wait_for_round(out, 2)
        network.net.signal_process("site_03-service", signal.SIGKILL)

    try:
        results = network.run(tmp_path, kill_site)
    finally:
        network.net.restart("site_03", "service")
    participation = results["participation"]
    assert participation["sites"] == ["site_01", "site_02"]
    assert participation["attempts"] == 2
    [dropout] = participation["dropped"]
    assert (dropout["site_id"], dropout["status"]) == ("site_03", "unavailable")
    assert "unreachable" in dropout["reason"]
    assert "Fix:" in dropout["reason"]
    pooled = network.pooled(["site_01", "site_02"])
    assert_crude_equals_pooled(results["analyses"]["crude"], pooled)
    assert_propensity_equals_pooled(results["propensity"], pooled)


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_supernode_is_left_out_and_the_study_finishes(network: Network, tmp_path: Path) -> None:
    """SIGKILL site_01's SuperNode after round 2: no reply within the timeout (Flower itself
    reports the node gone only after its heartbeat patience), retried, then left out."""
    def kill_supernode(out: Path) -> None:
        wait_for_round(out, 2)
        network.net.signal_process("site_01-supernode", signal.SIGKILL)

    try:
        results = network.run(tmp_path, kill_supernode)
    finally:
        network.net.restart("site_01", "supernode")
    participation = results["participation"]
    assert participation["sites"] == ["site_02", "site_03"]
    [dropout] = participation["dropped"]
    assert (dropout["site_id"], dropout["status"]) == ("site_01", "unavailable")
    assert_crude_equals_pooled(results["analyses"]["crude"], network.pooled(["site_02", "site_03"]))


@pytest.mark.integration
@pytest.mark.slow
def test_a_site_whose_table_vanished_answers_with_an_error_and_is_left_out(network: Network, tmp_path: Path) -> None:
    """site_02's `person` Delta table is moved away before the run: its site agent answers the
    first round with an error naming the site, table and fix; the study goes on without it."""
    lake = network.root / "data" / "sites" / "site_02" / "lake"
    shutil.move(lake / "person", network.root / "person.moved")
    try:
        results = network.run(tmp_path)
    finally:
        shutil.move(network.root / "person.moved", lake / "person")
    [dropout] = results["participation"]["dropped"]
    assert (dropout["site_id"], dropout["status"]) == ("site_02", "error")
    assert "person" in dropout["reason"]
    assert "Fix:" in dropout["reason"]
    assert results["participation"]["sites"] == ["site_01", "site_03"]
