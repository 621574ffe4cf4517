"""Load scenarios: many sites in one study; several studies at once on one coordinator.

``run_many_sites`` is ``fedrwe simulate`` with more sites (and less Spark memory per site).
``run_concurrent_studies`` starts one simulated network (one Prefect server, one SuperLink,
its sites) and runs the same protocol under several study ids: first one study alone, then
``studies`` of them submitted at once, each with its own out dir. Every study must give the
estimates of the one run alone (``compare_estimates``), and every site's hash-chained audit
log must verify afterwards, one entry per request.

How concurrent studies share the network (measured with flwr 1.42):
- the SuperLink runs one ``flwr-serverapp`` per run, side by side; a SuperNode starts one
  ``flwr-clientapp`` per message whatever its run, so the sites see the studies' rounds
  interleaved;
- at a site, the envelope gate (``site_agent.envelopes``) holds one lock around verifying,
  answering and signing, so the service answers one request at a time: the studies' rounds
  queue there, and the per-study state, the Delta writes under the workdir, the hash-chained
  audit log, the request ledger and the cohort registry see one request at a time;
- on the coordinator's side each submission stages its app and run config in a folder of
  its own (``flows.flower_runs.submission_dir``); a shared one was the race found here.

Figures: wall time, rounds, and the peak resident memory of the network's processes
(sampled once a second while the studies run; each process summed over its process tree,
so a site service includes its Spark JVM and the SuperLink its ServerApps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from rich.console import Console

from coordinator.results import comparison_views
from flows.localnet import LocalNetwork
from flows.simulate import (
    PeakMemory,
    SimulationSettings,
    claim_output_folder,
    run_simulation,
    simulated_sites,
    simulation_keys,
    start_timeout_s,
)
from flows.submit import run_and_explain, study_run_config
from shared.errors import FedRWEError
from shared.synthetic import generate_network
from site_agent.audit.delta_log import verify as verify_audit

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROTOCOL = REPO_ROOT / "studies" / "ketamine_cud.yaml"
ESTIMATE_RTOL = 1e-8  # the federated-equals-pooled contract, applied run against run
COUNT_KEYS = ("n_exposed", "n_comparator", "events_exposed", "events_comparator")
FLOAT_KEYS = ("hr", "log_hr", "se_log_hr", "ci_low", "ci_high")


def machine() -> dict[str, Any]:
    """The machine the figures were measured on."""
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def memory_by_kind(peaks: dict[str, int], total: int) -> dict[str, Any]:
    """Peak RSS in MiB: the whole network at once, then per process kind (site services with
    their JVM, SuperNodes with their ClientApps, the SuperLink with its ServerApps, Prefect):
    the largest single process of the kind and the sum of the kind's per-process peaks."""
    kinds: dict[str, list[int]] = {}
    for name, rss in peaks.items():
        kind = name.rsplit("-", 1)[-1] if name.startswith("site_") else name
        kinds.setdefault(kind, []).append(rss)
    mib = 2**20
    return {
        "total_mib": round(total / mib),
        "per_kind": {
            kind: {"processes": len(values), "max_mib": round(max(values) / mib), "sum_mib": round(sum(values) / mib)}
            for kind, values in sorted(kinds.items())
        },
    }


def rounds_of(results: dict[str, Any]) -> int:
    """How many rounds (exchanges with every site) the study took."""
    return sum(len(view["rounds"]) for view in comparison_views(results) if "error" not in view)


def compare_estimates(expected: dict[str, Any], actual: dict[str, Any], rtol: float = ESTIMATE_RTOL) -> list[str]:
    """Where ``actual``'s estimates differ from ``expected``'s: counts exactly, floats to ``rtol``.

    Covers every analysis (counts, HR, log HR, SE, CI) and the PS model's coefficients.
    Returns one line per difference (empty when equal).
    """
    problems: list[str] = []

    def close(where: str, a: Any, b: Any) -> None:
        if a is None or b is None:
            if a is not b:
                problems.append(f"{where}: {a!r} != {b!r}")
        elif not math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=0.0):
            problems.append(f"{where}: {a!r} != {b!r} (rtol {rtol:g})")

    if set(expected["analyses"]) != set(actual["analyses"]):
        problems.append(f"analyses {sorted(expected['analyses'])} != {sorted(actual['analyses'])}")
    for name, analysis in expected["analyses"].items():
        other = actual["analyses"].get(name, {})
        if ("error" in analysis) != ("error" in other):
            problems.append(f"{name}: error {analysis.get('error')!r} != {other.get('error')!r}")
            continue
        for key in COUNT_KEYS:
            if analysis.get(key) != other.get(key):
                problems.append(f"{name}.{key}: {analysis.get(key)!r} != {other.get(key)!r}")
        for key in FLOAT_KEYS:
            if key in analysis or key in other:
                close(f"{name}.{key}", analysis.get(key), other.get(key))
    ps_expected = expected.get("propensity", {}).get("coefficients", {})
    ps_actual = actual.get("propensity", {}).get("coefficients", {})
    if list(ps_expected) != list(ps_actual):
        problems.append(f"propensity terms {list(ps_expected)} != {list(ps_actual)}")
    for term, value in ps_expected.items():
        close(f"propensity.{term}", value, ps_actual.get(term))
    return problems


def run_many_sites(
    out: Path, *, sites: int, patients: int, seed: int = 7, driver_memory: str = "512m",
    protocol: Path = DEFAULT_PROTOCOL, prefect_api_url: str | None = None, start_timeout_s: float | None = None,
) -> dict[str, Any]:
    """One study over ``sites`` simulated sites (``fedrwe simulate``); its figures."""
    settings = SimulationSettings(
        out=out, sites=sites, patients=patients, seed=seed, protocol=protocol,
        prefect_api_url=prefect_api_url, spark_driver_memory=driver_memory, start_timeout_s=start_timeout_s,
    )
    started = time.perf_counter()
    results = run_simulation(settings, console=Console(quiet=True))
    wall = time.perf_counter() - started
    timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    peaks = timings["peak_rss_bytes"]
    return {
        "scenario": "many_sites", "sites": sites, "patients": patients, "studies": 1,
        "driver_memory": driver_memory, "wall_s": round(wall, 1),
        "start_network_s": timings["start_network_s"], "study_s": timings["study_run_s"],
        "rounds": rounds_of(results), "peak_rss_bytes": peaks,
        "peak_rss": memory_by_kind(peaks["per_process"], peaks["total"]),
        "results": str(out / "results.json"),
    }


def _protocol_as(protocol: Path, study_id: str, folder: Path) -> Path:
    """The protocol under another study id (the rest unchanged), written to ``folder``."""
    data = yaml.safe_load(protocol.read_text(encoding="utf-8"))
    data["study_id"] = study_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{study_id}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _run_study(network: LocalNetwork, protocol: Path, out: Path, extra: dict[str, str]) -> dict[str, Any]:
    """Submit one study and follow it to the end; its figures."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    run = run_and_explain(network.submit_run, study_run_config(protocol, out, **extra), out, network.run_dir / "logs")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {
        "study_id": results["study_id"], "flower_run_id": run.run_id,
        "wall_s": round(time.perf_counter() - started, 1), "rounds": rounds_of(results),
        "results": str(out / "results.json"),
    }


def run_concurrent_studies(
    out: Path, *, sites: int, patients: int, studies: int, seed: int = 7, driver_memory: str = "512m",
    protocol: Path = DEFAULT_PROTOCOL, prefect_api_url: str | None = None,
) -> dict[str, Any]:
    """One network; the protocol alone, then ``studies`` copies (own study ids) at once.

    Raises ``FedRWEError`` naming every study that failed or whose estimates differ from
    the study run alone.
    """
    out = out.resolve()
    claim_output_folder(out)
    started = time.perf_counter()
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    generate_network(data_dir, n_sites=sites, n_patients=patients, seed=seed)
    specs, workdirs = simulated_sites(data_dir / "sites", out / "sites", "local[2]", driver_memory)
    extra = {"truth-path": str(data_dir / "truth.json"), **simulation_keys(out / "sites").run_config()}
    base_id = str(yaml.safe_load(protocol.read_text(encoding="utf-8"))["study_id"])
    protocols = out / "protocols"
    t_start = time.perf_counter()
    with LocalNetwork(
        out / "run", specs, prefect_api_url=prefect_api_url, start_timeout_s=start_timeout_s(sites)
    ) as network:
        start_network_s = time.perf_counter() - t_start
        with PeakMemory(network) as memory:
            alone = _run_study(network, _protocol_as(protocol, f"{base_id}_alone", protocols), out / "alone", extra)
            t_together = time.perf_counter()
            figures: list[dict[str, Any] | None] = [None] * studies
            failures: list[str] = []

            def one(i: int) -> None:
                study_id = f"{base_id}_{i + 1}"
                try:
                    figures[i] = _run_study(
                        network, _protocol_as(protocol, study_id, protocols), out / f"study_{i + 1}", extra
                    )
                except FedRWEError as error:
                    failures.append(f"{study_id}: {error}")

            threads = [threading.Thread(target=one, args=(i,), name=f"study-{i + 1}") for i in range(studies)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            together_s = time.perf_counter() - t_together
    expected = json.loads(Path(alone["results"]).read_text(encoding="utf-8"))
    for study in figures:
        if study is not None:
            actual = json.loads(Path(study["results"]).read_text(encoding="utf-8"))
            failures += [f"{study['study_id']}: {p}" for p in compare_estimates(expected, actual)]
    if failures or any(study is None for study in figures):
        raise FedRWEError("concurrent studies failed or differ from the study alone:\n" + "\n".join(failures))
    audit = {spec.site_id: verify_audit(workdir / "audit") for spec, workdir in zip(specs, workdirs, strict=True)}
    broken = {site: check.reason for site, check in audit.items() if not check.ok}
    if broken:
        raise FedRWEError(f"the audit log is broken after concurrent studies at {broken}")
    return {
        "scenario": "concurrent_studies",
        "audit_entries": {site: check.entries for site, check in audit.items()}, "sites": sites, "patients": patients, "studies": studies,
        "driver_memory": driver_memory, "wall_s": round(time.perf_counter() - started, 1),
        "start_network_s": round(start_network_s, 1), "alone": alone,
        "together_s": round(together_s, 1), "runs": figures,
        "rounds": sum(study["rounds"] for study in figures if study is not None),
        "peak_rss_bytes": {"per_process": memory.per_process, "total": memory.total},
        "peak_rss": memory_by_kind(memory.per_process, memory.total),
    }
