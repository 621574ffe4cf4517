"""End to end on real processes: Prefect server, SuperLink, 3 SuperNodes, 3 Spark site agents.

``fedrwe simulate``'s code path runs a small study; the federated numbers must equal
statsmodels on the pooled rows, Prefect must list the flow run with one task run per
round, and no process may be left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from flows.simulate import SimulationSettings, run_simulation
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled

PROTOCOL = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"


class ChildWatcher:
    """Records every descendant process of this test process seen while a block runs."""

    def __init__(self) -> None:
        self.before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.seen |= {p.pid for p in psutil.Process().children(recursive=True)}
            self._stop.wait(0.5)

    def __enter__(self) -> ChildWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def still_running(self) -> set[int]:
        return {pid for pid in self.seen - self.before if psutil.pid_exists(pid)}


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sim")
    settings = SimulationSettings(
        out=out, sites=3, patients=9_000, seed=11, protocol=PROTOCOL, prefect_api_url=prefect_api_url
    )  # seed 11: every binary covariate level has >= 10 persons at each site (the default
    # site policy withholds the PS of a site where a level is rarer, e.g. race_asian at seed 5)
    printed = io.StringIO()
    with ChildWatcher() as watcher:
        results = run_simulation(settings, console=Console(file=printed, width=200))
    assert len(watcher.seen - watcher.before) >= 10  # SuperLink, 3 x (service, JVM, SuperNode), ...
    return {"out": out, "results": results, "leftover": watcher.still_running(), "printed": printed.getvalue()}


@pytest.mark.integration
def test_federated_numbers_equal_statsmodels_on_the_pooled_rows(simulation: dict[str, Any]) -> None:
    out = simulation["out"]
    results = json.loads((out / "results.json").read_text())
    crude = results["analyses"]["crude"]
    table = pq.read_table(out / "sim" / "pooled_analysis_dataset.parquet")
    assert table.schema.metadata[b"fedrwe.simulation_only"] == b"true"
    assert_crude_equals_pooled(crude, table.to_pandas())
    assert_propensity_equals_pooled(results["propensity"], table.to_pandas())
    for name, analysis in results["analyses"].items():  # at 9,000 patients a small site may withhold one
        assert "hr" in analysis or "withheld by site(s)" in analysis["error"], (name, analysis.get("error"))
    assert [s["site_id"] for s in results["sites"]] == ["site_01", "site_02", "site_03"]
    assert results["protocol_sha256"]
    assert results["software"]["flwr"] == "1.42.0"


@pytest.mark.integration
def test_outputs_are_written(simulation: dict[str, Any]) -> None:
    out = simulation["out"]
    report = (out / "report.html").read_text()
    assert "matched analysis" in report  # the primary analysis leads the report
    assert ">Results</h2>" in report
    assert "Crude Cox model" in report
    assert "Planted truth" in report
    assert json.loads((out / "truth.json").read_text())["hr_conditional"] == pytest.approx(1.98)
    rounds = simulation["results"]["rounds"]
    assert rounds[0]["name"] == "1-summary"
    assert rounds[-1]["name"].endswith("-adjusted")
    assert len(rounds) <= 6  # the whole reference study
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in rounds)
    results = simulation["results"]  # signed end to end, every site approved automatically
    assert results["envelopes"]["signed"] is True
    assert sorted(results["envelopes"]["site_key_ids"]) == ["site_01", "site_02", "site_03"]
    assert {a["mode"] for a in results["site_approvals"].values()} == {"auto"}
    assert all(site["disclosure"] == {"suppressed": []} for site in results["sites"])  # listed, none here
    assert (out / "keys" / "coordinator.pem").exists()


@pytest.mark.integration
def test_prefect_lists_the_flow_run_with_one_task_run_per_round(
    simulation: dict[str, Any], prefect_api_url: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
        run_id = simulation["results"]["orchestration"]["prefect_flow_run_id"]
        flow_runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["fedrwe-study"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        )
        assert len(flow_runs) == 1
        assert flow_runs[0].name.startswith(f"{simulation['results']['study_id']} (1 comparison) flower-run ")
        assert flow_runs[0].state is not None
        assert flow_runs[0].state.is_completed()
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_runs[0].id]))
        )
    names = sorted(run.name for run in task_runs)
    assert names == sorted(r["name"] for r in simulation["results"]["rounds"])
    ui = prefect_api_url.removesuffix("/api")
    assert f"Prefect flow run: {ui}/runs/flow-run/{run_id} (served by the Prefect server you passed)" in simulation["printed"]


@pytest.mark.integration
def test_the_simulation_shows_every_round_as_it_is_journaled(simulation: dict[str, Any]) -> None:
    printed = simulation["printed"]
    rounds = simulation["results"]["rounds"]
    assert f"rounds done: {len(rounds)}" in printed
    for record in rounds:
        assert record["name"] in printed
    assert all(site in printed for site in ("site_01", "site_02", "site_03"))


@pytest.mark.integration
def test_the_study_ran_over_tls_with_registered_supernodes(simulation: dict[str, Any]) -> None:
    logs = simulation["out"] / "run" / "logs"
    superlink = (logs / "superlink.log").read_text()
    assert "--enable-supernode-auth" in superlink.splitlines()[0]  # the command line
    assert "Uvicorn running on https://127.0.0.1:" in superlink
    assert superlink.count("[Fleet.ActivateNode] Activated node_id=") == 3
    assert "ApiError" not in superlink
    for site in ("site_01", "site_02", "site_03"):
        command = (logs / f"{site}-supernode.log").read_text().splitlines()[0]
        assert "--root-certificates" in command
        assert f"--auth-supernode-private-key {simulation['out'] / 'run' / 'pki' / 'sites' / site}.key" in command
        assert "--insecure" not in command
    startup = json.loads((simulation["out"] / "timings.json").read_text())["process_startup_s"]
    assert startup["register-supernodes"] > 0


@pytest.mark.integration
def test_no_process_is_left_running(simulation: dict[str, Any]) -> None:
    assert simulation["leftover"] == set()
