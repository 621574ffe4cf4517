"""A paper-scale network on one machine, federated against pooled (issue items 1-3).

The reference study (Gao et al. 2023) drew ~380,000 CUD patients from a federated EHR
network. This benchmark builds a network of that size on localhost and runs the reference
protocol (studies/ketamine_cud.yaml) end to end, the way a real network would get its
data in:

    generate     the synthetic OMOP network (shared/synthetic), planted HR known
    export       each site's tables written as OMOP CSV files (what a hospital exports)
    ingest       ``site_agent.ingest.ingest_omop`` per site: CSV -> checked Delta tables
    study        ``fedrwe simulate`` on the ingested lakes: Prefect server, TLS SuperLink,
                 a Spark site service + SuperNode per site, the study as a Flower run
    report       report.html rendered again from results.json, timed alone
    pooled       the same analyses on all sites' rows in one process (bench/pooled.py:
                 pandas + statsmodels/lifelines), timed; every estimate compared

Tables: rows per OMOP table per site; wall time per step (Spark start, each site's cohort
extraction, each round); peak RSS per process; federated vs pooled (time ratio, largest
relative difference per analysis); Flower exchanges and bytes per site.

    .venv/bin/python bench/paper_scale.py --quick     # 15,000 CUD patients, ~4 min
    .venv/bin/python bench/paper_scale.py             # 380,000 CUD patients, background x2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
from deltalake import DeltaTable  # noqa: E402
from rich.console import Console  # noqa: E402

from bench.common import PeakRSS, machine, mib, table, write_result  # noqa: E402
from bench.pooled import WEIGHTED, pooled_analyses, relative_differences  # noqa: E402
from coordinator.report import write_report  # noqa: E402
from flows.load import memory_by_kind  # noqa: E402
from flows.simulate import SimulationSettings, claim_output_folder, run_simulation  # noqa: E402
from shared.protocol.model import load_protocol  # noqa: E402
from shared.synthetic import generate_network  # noqa: E402
from site_agent.ingest.load import ingest_omop  # noqa: E402
from site_agent.ingest.settings import IngestSettings  # noqa: E402

PROTOCOL = REPO_ROOT / "studies" / "ketamine_cud.yaml"
MODES = {
    "quick": {"sites": 3, "patients": 15_000, "background_ratio": 2.0, "driver_memory": "1g"},
    "full": {"sites": 3, "patients": 380_000, "background_ratio": 2.0, "driver_memory": "2g"},
}
EVENT_TABLES = ("condition_occurrence", "drug_exposure", "visit_occurrence", "death")


def prepare_network(data_dir: Path, sites: int, patients: int, background_ratio: float, seed: int) -> dict[str, Any]:
    """Generate, export as OMOP CSV and ingest; ``data_dir`` ends as ``fedrwe simulate`` expects
    (``truth.json``, ``sites/<site>/lake``). Returns the seconds per step and rows per table."""
    seconds: dict[str, Any] = {"ingest_per_site": {}}
    generated = data_dir / "generated"
    started = time.perf_counter()
    generate_network(generated, n_sites=sites, n_patients=patients, seed=seed, background_ratio=background_ratio)
    seconds["generate"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    for site in sorted((generated / "sites").iterdir()):
        export = data_dir / "export" / site.name
        export.mkdir(parents=True)
        for lake_table in sorted((site / "lake").iterdir()):
            pacsv.write_csv(DeltaTable(str(lake_table)).to_pyarrow_table(), export / f"{lake_table.name}.csv")
    seconds["export_csv"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    for export in sorted((data_dir / "export").iterdir()):
        t0 = time.perf_counter()
        result = ingest_omop(IngestSettings(
            omop=export, source_format="csv", site_id=export.name, lake=data_dir / "sites" / export.name / "lake"))
        result.report.raise_for_errors()
        seconds["ingest_per_site"][export.name] = round(time.perf_counter() - t0, 2)
    seconds["ingest"] = round(time.perf_counter() - started, 2)
    shutil.copyfile(generated / "truth.json", data_dir / "truth.json")
    csv_bytes = sum(f.stat().st_size for f in (data_dir / "export").rglob("*.csv"))
    shutil.rmtree(generated)
    shutil.rmtree(data_dir / "export")
    rows = {
        site.name: {t.name: DeltaTable(str(t)).to_pyarrow_dataset().count_rows()
                    for t in sorted((site / "lake").iterdir()) if not t.name.startswith("_")}
        for site in sorted((data_dir / "sites").iterdir())
    }
    return {"seconds": seconds, "rows": rows, "csv_bytes": csv_bytes}


def rows_table(rows: dict[str, dict[str, int]], truth: dict[str, Any]) -> dict[str, Any]:
    """Rows per OMOP table (columns: sites, then the network)."""
    sites = sorted(rows)
    names = sorted({name for per_site in rows.values() for name in per_site})
    body = [[name, *(rows[s].get(name, 0) for s in sites), sum(rows[s].get(name, 0) for s in sites)] for name in names]
    events = [sum(rows[s].get(t, 0) for t in EVENT_TABLES) for s in sites]
    body.append(["event rows (condition + drug + visit + death)", *events, sum(events)])
    note = (f"{truth['n_patients']:,} CUD patients, {truth['n_background']:,} background persons without CUD, "
            f"{truth['n_antidepressant']:,} CUD patients with depression starting an antidepressant (seed {truth['seed']})")
    return table("Rows per OMOP table (after ingest)", ["table", *sites, "network"], body, note)


def wall_table(prep: dict[str, Any], timings: dict[str, Any], report_s: float, pooled_s: float) -> dict[str, Any]:
    """Wall seconds per step, in the order they happen."""
    startup = timings["process_startup_s"]
    body: list[list[Any]] = [
        ["generate (synthetic OMOP, Delta)", prep["seconds"]["generate"]],
        ["export as OMOP CSV (simulation only)", prep["seconds"]["export_csv"]],
        *[[f"ingest {site} (CSV -> Delta + checks)", s] for site, s in prep["seconds"]["ingest_per_site"].items()],
        ["network start (all processes, in parallel)", timings["start_network_s"]],
        *[[f"  Spark site service ready: {k.removesuffix('-service')}", v] for k, v in sorted(startup.items())
          if k.endswith("-service")],
        ["  Prefect server ready", startup.get("prefect-server", 0.0)],
        ["  SuperLink ready", startup.get("superlink", 0.0)],
        ["  SuperNode keys registered", startup.get("register-supernodes", 0.0)],
        ["study (submit -> results.json + report)", timings["study_run_s"]],
        *[[f"  round {name}", s] for name, s in timings["rounds_s"].items()],
        *[[f"    cohort extraction {site} (inside round 1)", s] for site, s in sorted(timings["cohort_s"].items())],
        ["report.html rendered again from results.json", report_s],
        ["pooled analyses in one process (bench/pooled.py)", pooled_s],
        ["total (generate -> federated results)", round(
            prep["seconds"]["generate"] + prep["seconds"]["export_csv"] + prep["seconds"]["ingest"] + timings["total_s"], 2)],
    ]
    return table("Wall time per step (s)", ["step", "seconds"], body,
                 "Rounds run one after the other; the cohort extractions run in parallel inside round 1.")


def memory_table(peaks: dict[str, int], total: int, bench_peak: int) -> dict[str, Any]:
    """Peak RSS per process of the network (a site service includes its Spark JVM)."""
    body = [[name, mib(rss)] for name, rss in sorted(peaks.items())]
    body.append(["all network processes at once", mib(total)])
    body.append(["the benchmark's own process (generate, export, ingest, pooled analyses)", mib(bench_peak)])
    return table("Peak RSS per process (MiB)", ["process", "peak MiB"], body,
                 "Sampled once a second; site_NN-service = the site's Python service with its Spark JVM.")


def pooled_comparison(out: Path, results: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float], float]:
    """Run the pooled analyses on ``out/sim``'s pooled rows; differences, step seconds, total seconds."""
    protocol = load_protocol(PROTOCOL)
    started = time.perf_counter()
    pooled = pd.read_parquet(out / "sim" / "pooled_analysis_dataset.parquet")
    read_s = time.perf_counter() - started
    terms = list(results["propensity"]["coefficients"])[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines warns that IPTW weights are not integers
        reference, steps = pooled_analyses(pooled, terms, protocol.matching.caliper, protocol.horizon_days())
    total = time.perf_counter() - started
    steps = {"read pooled rows (Parquet)": round(read_s, 4), **steps}
    return relative_differences(results, reference), steps, round(total, 3)


def comparison_tables(diffs: list[dict[str, Any]], steps: dict[str, float], pooled_s: float,
                      timings: dict[str, Any]) -> list[dict[str, Any]]:
    """Time ratio and the largest relative difference per analysis."""
    cohort = max(timings["cohort_s"].values())
    study = timings["study_run_s"]
    analysis_only = study - cohort
    ratio = table("Federated vs pooled: time", ["what", "federated s", "pooled s", "ratio"], [
        ["whole study (federated includes cohort extraction)", study, pooled_s, round(study / pooled_s, 1)],
        ["analysis only (federated minus the slowest cohort extraction)", round(analysis_only, 2), pooled_s,
         round(analysis_only / pooled_s, 1)],
    ], "Pooled = reading the pooled analysis rows and fitting every analysis in one process; it needs the "
       "rows in one place, which a federated network never has.")
    step_table = table("Pooled analyses: seconds per step", ["step", "seconds"], [[k, v] for k, v in steps.items()])
    by_analysis: dict[str, list[dict[str, Any]]] = {}
    for row in diffs:
        by_analysis.setdefault(row["analysis"], []).append(row)
    body = []
    for name in ("crude", "propensity", "matched", *WEIGHTED):
        rows = by_analysis.get(name, [])
        counts = [r for r in rows if r["quantity"].startswith(("n_", "events_"))]
        estimates = [r for r in rows if r not in counts and r["rel_diff"] is not None]
        missing = [r["quantity"] for r in rows if r["rel_diff"] is None]
        worst = max(estimates, key=lambda r: r["rel_diff"]) if estimates else None
        body.append([
            name, len(estimates), "yes" if all(r["federated"] == r["pooled"] for r in counts) else "NO",
            worst["rel_diff"] if worst else None, worst["quantity"] if worst else "-",
            ", ".join(missing) or "-",
        ])
    worst_all = max((r["rel_diff"] for r in diffs if r["rel_diff"] is not None
                     and not r["quantity"].startswith(("n_", "events_"))), default=None)
    diff_table = table("Federated vs pooled: largest relative difference per analysis",
                       ["analysis", "estimates", "counts equal", "max rel diff", "at", "no federated value"], body,
                       f"Largest over every estimate: {worst_all:.2e}. Estimates: log HR, SE, HR, CI, risks at the "
                       "horizon; PS coefficients, SEs and caliper." if worst_all is not None else "")
    return [ratio, step_table, diff_table]


def rounds_table(results: dict[str, Any]) -> dict[str, Any]:
    """Flower exchanges and bytes per site for the whole study."""
    rounds = results["rounds"]
    sites = sorted({s for r in rounds for s in r.get("bytes_by_site", {})})
    body = []
    for r in rounds:
        per_site = r.get("bytes_by_site", {})
        body.append([r["name"], r["seconds"], *(f"{per_site[s]['sent']:,} / {per_site[s]['received']:,}"
                                                  if s in per_site else "-" for s in sites)])
    totals = [sum(r["bytes_by_site"][s]["sent"] + r["bytes_by_site"][s]["received"] for r in rounds
                  if s in r.get("bytes_by_site", {})) for s in sites]
    body.append(["all rounds (bytes both ways)", round(sum(r["seconds"] for r in rounds), 2), *(f"{t:,}" for t in totals)])
    return table(f"Flower exchanges: {len(rounds)} rounds; bytes sent / received per site",
                 ["round", "seconds", *sites], body,
                 "One exchange = one message to every site and its signed reply (Flower message payload bytes).")


def run(mode: str, out: Path | None = None, seed: int = 7) -> Path:
    """Run the benchmark in ``mode`` ('quick' or 'full'); the result file's path."""
    params = {**MODES[mode], "seed": seed, "protocol": str(PROTOCOL.relative_to(REPO_ROOT))}
    at_start = machine()
    keep = out is not None
    out = (out or Path(tempfile.mkdtemp(prefix="fedrwe-paper-"))).resolve()
    if out.exists():
        shutil.rmtree(out)
    try:
        claim_output_folder(out)  # the simulation's marker: run_simulation may then use the folder
        with PeakRSS(interval_s=1.0, children=False) as own:
            prep = prepare_network(out / "data", params["sites"], params["patients"], params["background_ratio"], seed)
            settings = SimulationSettings(out=out, sites=params["sites"], patients=params["patients"], seed=seed,
                                          protocol=PROTOCOL, spark_driver_memory=params["driver_memory"])
            run_simulation(settings, Console(width=120), generate=False)
            results = json.loads((out / "results.json").read_text(encoding="utf-8"))
            truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
            timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
            started = time.perf_counter()
            write_report(out / "report_again.html", results, truth)
            report_s = round(time.perf_counter() - started, 3)
            diffs, steps, pooled_s = pooled_comparison(out, results)
        peaks = timings["peak_rss_bytes"]
        tables = [
            rows_table(prep["rows"], truth),
            wall_table(prep, timings, report_s, pooled_s),
            memory_table(peaks["per_process"], peaks["total"], own.total),
            *comparison_tables(diffs, steps, pooled_s, timings),
            rounds_table(results),
        ]
        data = {
            "prepare": prep, "timings": timings, "report_s": report_s, "pooled_s": pooled_s,
            "pooled_steps": steps, "differences": diffs, "rounds": results["rounds"],
            "memory_by_kind": memory_by_kind(peaks["per_process"], peaks["total"]),
            "estimates": {name: {k: a.get(k) for k in ("hr", "ci_low", "ci_high", "n_exposed", "n_comparator")}
                          for name, a in results["analyses"].items()},
            "planted_hr": truth.get("hr_conditional"),
        }
        return write_result("paper_scale", mode, params, tables, data, started_machine=at_start)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15,000 CUD patients instead of 380,000")
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temp dir, removed)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    run("quick" if args.quick else "full", args.out, args.seed)


if __name__ == "__main__":
    main()
