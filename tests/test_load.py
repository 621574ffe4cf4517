"""Load: many sites in one study, and several studies at once on one coordinator.

The first fast test reproduces the race found when several studies are submitted at
once into one run folder (``flows.flower_runs.submission_dir``): without a folder per
submission, the second submission rewrote the staged app and run config that ``flwr run``
of the first was about to read, so the first study ran with the second's protocol and
out dir. The second keeps claimed ports out of the range the kernel assigns by itself
(``flows.localnet.free_port``). The slow tests run both load scenarios of ``flows.load`` at a small size on real
processes and check their estimates.
"""

from __future__ import annotations

import json
import threading
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flows import flower_runs
from flows.load import ESTIMATE_RTOL, compare_estimates, run_concurrent_studies, run_many_sites
from flows.localnet import ephemeral_ports, free_port
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled


def test_concurrent_submissions_each_run_their_own_run_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two studies submitted at once into one run dir: each ``flwr run`` reads its own config.

    A barrier holds both submissions at the ``flwr run`` call until both have staged, the
    interleaving that made the first run read the second's config with a shared folder.
    """
    both_staged = threading.Barrier(2, timeout=30)
    submitted: dict[str, tuple[str, str]] = {}
    run_ids = {"study-a": 1, "study-b": 2}

    def fake_flwr(args: Sequence[str], flwr_home: Path, timeout_s: float) -> str:
        assert args[0] == "run"
        both_staged.wait()
        overrides = tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text(encoding="utf-8"))
        declared = tomllib.loads((Path(args[1]) / "pyproject.toml").read_text(encoding="utf-8"))
        name = threading.current_thread().name
        submitted[name] = (overrides["out-dir"], declared["tool"]["flwr"]["app"]["config"]["protocol-yaml"])
        return json.dumps({"success": True, "run-id": run_ids[name]})

    def fake_follow(run_id: int, *args: object) -> dict[str, Any]:
        return {"status": "finished:completed", "run-id": run_id}

    monkeypatch.setattr(flower_runs, "_flwr", fake_flwr)
    monkeypatch.setattr(flower_runs, "_follow", fake_follow)
    (tmp_path / "logs").mkdir()
    errors: list[BaseException] = []

    def submit(name: str) -> None:
        try:
            config = {"out-dir": f"/out/{name}", "protocol-yaml": f"study_id: {name}"}
            flower_runs.submit_run(config, flwr_home=tmp_path / "cli", run_dir=tmp_path)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=submit, args=(name,), name=name) for name in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert submitted == {name: (f"/out/{name}", f"study_id: {name}") for name in run_ids}


def test_claimed_ports_lie_below_the_kernels_ephemeral_range() -> None:
    """Ports claimed for services started later cannot be handed out by the kernel meanwhile.

    With ten sites, the Spark JVMs starting between a claim and its bind took a claimed
    ephemeral port, and a SuperNode then failed with "address already in use".
    """
    low, _ = ephemeral_ports()
    ports = [free_port() for _ in range(50)]
    assert all(port < low for port in ports), sorted(ports)


@pytest.mark.slow
@pytest.mark.integration
def test_many_sites_in_one_study_equal_the_pooled_fit(tmp_path: Path, prefect_api_url: str) -> None:
    """Five sites in one study complete; crude Cox and the PS model equal statsmodels on the pooled rows.

    Seed 5 at 15,000 patients: every site holds at least 10 events per arm and 10 persons at
    each level of every binary covariate, so the default policy withholds nothing.
    """
    figures = run_many_sites(
        tmp_path / "many", sites=5, patients=15_000, seed=5, driver_memory="512m",
        prefect_api_url=prefect_api_url,
    )
    assert figures["rounds"] >= 3
    assert figures["peak_rss_bytes"]["total"] > 0
    results = json.loads((tmp_path / "many" / "results.json").read_text(encoding="utf-8"))
    assert [s["site_id"] for s in results["sites"]] == [f"site_{i:02d}" for i in range(1, 6)]
    pooled = pd.read_parquet(tmp_path / "many" / "sim" / "pooled_analysis_dataset.parquet")
    assert_crude_equals_pooled(results["analyses"]["crude"], pooled)
    assert_propensity_equals_pooled(results["propensity"], pooled)


@pytest.mark.slow
@pytest.mark.integration
def test_three_studies_at_once_equal_each_study_alone(tmp_path: Path) -> None:
    """Three studies at once on one coordinator give the estimates of the study run alone, and
    every site's audit log verifies afterwards with one entry per request."""
    figures = run_concurrent_studies(
        tmp_path / "concurrent", sites=3, patients=9_000, studies=3, seed=11, driver_memory="512m",
    )
    assert len(figures["runs"]) == 3
    alone = json.loads(Path(figures["alone"]["results"]).read_text(encoding="utf-8"))
    for study in figures["runs"]:
        together = json.loads(Path(study["results"]).read_text(encoding="utf-8"))
        assert together["study_id"] == study["study_id"] != alone["study_id"]
        assert compare_estimates(alone, together) == []
        assert together["analyses"]["crude"]["hr"] == pytest.approx(alone["analyses"]["crude"]["hr"], rel=ESTIMATE_RTOL)
    requests = figures["alone"]["rounds"] + figures["rounds"]  # one per round, per site
    assert figures["audit_entries"] == {f"site_{i:02d}": requests for i in range(1, 4)}
