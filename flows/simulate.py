"""The localhost simulation: synthetic data -> site agents -> study over Flower -> report.

    generate the network (Delta tables per site, truth.json)
    start a Prefect server, a SuperLink, and per site a site service + a SuperNode
    submit the study as a Flower run (its ServerApp runs the Prefect study flow)
    write the pooled analysis dataset (simulation only), print the summary, stop everything
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w
from deltalake import DeltaTable
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from coordinator.results import comparison_views
from flows.keys import NetworkKeys, make_network_keys
from flows.localnet import LocalNetwork, SiteSpec, free_port
from flows.progress import JournalProgress, flow_run_url
from flows.submit import run_and_explain, study_run_config
from flows.summary import print_estimates
from shared.errors import DataError
from shared.protocol.model import StudyProtocol, load_protocol
from shared.synthetic import generate_network


class SimulationSettings(BaseModel):
    """What ``fedrwe simulate`` runs."""

    model_config = ConfigDict(frozen=True)

    out: Path = Field(description="Output folder.")
    sites: int = Field(default=3, ge=1, le=50, description="Number of simulated sites.")
    patients: int = Field(default=30_000, ge=100, description="CUD patients over the network.")
    background_ratio: float = Field(
        default=0.25, ge=0, description="Persons without CUD per CUD patient (the background EHR population)."
    )
    seed: int = Field(default=7, description="Seed of the synthetic data.")
    protocol: Path = Field(default=Path("studies/ketamine_cud.yaml"), description="Study protocol.")
    prefect_api_url: str | None = Field(default=None, description="Existing Prefect server, if any.")
    spark_master: str = Field(default="local[2]", description="Spark master of every simulated site.")
    spark_driver_memory: str = Field(default="1g", description="Driver (JVM heap) memory per site.")
    start_timeout_s: float | None = Field(
        default=None, gt=0, description="Seconds each process may take to start (default: start_timeout_s(sites))."
    )
    insecure_transport: bool = Field(
        default=False, description="Plain HTTP and no SuperNode authentication (debugging only)."
    )


class PeakMemory:
    """Samples the resident memory of the network's processes once a second; keeps peaks."""

    def __init__(self, network: LocalNetwork) -> None:
        self._network = network
        self.per_process: dict[str, int] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self._network.rss_bytes()
            for name, rss in sample.items():
                self.per_process[name] = max(self.per_process.get(name, 0), rss)
            self.total = max(self.total, sum(sample.values()))
            self._stop.wait(1.0)


def write_site_settings(
    site_id: str, lake: Path, workdir: Path, port: int, master: str, driver_memory: str,
    keys: NetworkKeys | None = None,
) -> Path:
    """A site's settings file, as a hospital would write it (with the simulation's keys and
    automatic approval when ``keys`` is given)."""
    path = workdir.parent / "site.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "site_id": site_id, "lake": str(lake), "workdir": str(workdir),
        "host": "127.0.0.1", "port": port,
        "spark": {"master": master, "driver_memory": driver_memory},
        "policy": {"min_cell_count": 10},
    }
    if keys is not None:
        settings |= {"approval": {"mode": "auto"}, "envelopes": keys.site_settings(site_id)}
    path.write_text(tomli_w.dumps(settings), encoding="utf-8")
    return path


def start_timeout_s(sites: int) -> float:
    """How long one process may take to become ready when ``sites`` Spark sites start at once.

    Every site service starts a JVM and every site's key is registered (one ``flwr`` CLI
    process each) at the same moment, sharing the machine's cores, so the slowest start
    grows with their number (10 sites on 2 busy cores: registration 72 s, site services
    ready after 82 s, against the network's default limit of 90 s). 90 s plus 10 s per site
    beyond three.
    """
    return 90.0 + 10.0 * max(sites - 3, 0)


_MARKER = ".fedrwe-simulation"


def claim_output_folder(out: Path) -> None:
    """Use ``out`` only if it is new, empty, or an earlier simulation's (it is overwritten)."""
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).exists():
        raise DataError(
            f"output folder {out} is not empty and was not made by `fedrwe simulate`; it is not "
            f"overwritten. Fix: choose a new --out folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("made by fedrwe simulate; its contents are rewritten by each run\n")


def simulated_sites(
    lakes: Path, sites_dir: Path, master: str, driver_memory: str = "1g"
) -> tuple[list[SiteSpec], list[Path]]:
    """Settings, a service command and a fresh workdir for every generated site; the keys of
    the network (``simulation_keys(sites_dir)``) are made fresh too."""
    specs, workdirs = [], []
    site_dirs = sorted(lakes.iterdir())
    keys = make_network_keys(simulation_keys(sites_dir).folder, [d.name for d in site_dirs])
    for site_dir in site_dirs:
        workdir = sites_dir / site_dir.name / "work"
        if workdir.exists():
            shutil.rmtree(workdir)
        port = free_port()
        config = write_site_settings(site_dir.name, site_dir / "lake", workdir, port, master, driver_memory, keys)
        argv = [sys.executable, "-m", "site_agent.service", "--config", str(config)]
        specs.append(SiteSpec(site_id=site_dir.name, service_argv=argv, service_port=port))
        workdirs.append(workdir)
    return specs, workdirs


def simulation_keys(sites_dir: Path) -> NetworkKeys:
    """Where ``simulated_sites`` puts the network's keys: ``keys/`` next to ``sites_dir``."""
    return NetworkKeys(sites_dir.resolve().parent / "keys")


def write_pooled_datasets(study: StudyProtocol, results: dict[str, Any], site_workdirs: list[Path], folder: Path) -> int:
    """Pooled rows of every comparison that ran (``pooled_analysis_dataset[__ID].parquet``);
    the number of rows written."""
    rows = 0
    for view in comparison_views(results):
        if "error" not in view:
            cid = view["comparison_id"]
            name = "pooled_analysis_dataset" + (f"__{cid}" if cid else "") + ".parquet"
            rows += write_pooled_dataset(study.resolve(cid), site_workdirs, folder / name)
    return rows


def write_pooled_dataset(protocol: StudyProtocol, site_workdirs: list[Path], path: Path) -> int:
    """Stack every site's analysis rows into one Parquet file, marked simulation-only."""
    columns = ["site_id", "person_id", "treatment", "time", "event", *protocol.covariate_columns()]
    parts = []
    for workdir in site_workdirs:
        table_path = workdir / "studies" / protocol.study_id / "analysis_dataset"
        if not DeltaTable.is_deltatable(str(table_path)):
            raise DataError(f"no analysis dataset at {table_path}: the study did not reach this site")
        parts.append(DeltaTable(str(table_path)).to_pyarrow_table(columns=columns))
    pooled = pa.concat_tables(parts)
    metadata = {
        b"fedrwe.simulation_only": b"true",
        b"fedrwe.description": (
            b"SIMULATION ONLY: every site's analysis rows pooled, so the federated numbers can be "
            b"checked independently. A real fedrwe network never pools patient rows."
        ),
        b"fedrwe.study_id": protocol.study_id.encode(),
        b"fedrwe.protocol_sha256": protocol.sha256().encode(),
    }
    pooled = pooled.replace_schema_metadata({**(pooled.schema.metadata or {}), **metadata})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pooled, path)
    return int(pooled.num_rows)


def run_simulation(settings: SimulationSettings, console: Console, *, generate: bool = True) -> dict[str, Any]:
    """Run the whole simulated study; every process started is stopped before returning.

    ``generate=False`` uses the network already in ``OUT/data`` (``truth.json`` and
    ``sites/<site_id>/lake``), as bench/paper_scale.py leaves it after a real OMOP ingest.
    """
    out = settings.out.resolve()
    protocol = load_protocol(settings.protocol)  # a bad protocol fails before any work
    data_dir = out / "data"
    if not generate and not (data_dir / "truth.json").is_file():
        raise DataError(f"no generated network in {data_dir} (truth.json is missing). Fix: run with generate=True.")
    claim_output_folder(out)
    shutil.rmtree(out / "journal", ignore_errors=True)  # this folder's earlier run: simulate starts afresh
    timings: dict[str, Any] = {}
    started = time.perf_counter()

    if generate:
        console.print(f"[bold]1/4[/] generating {settings.patients:,} CUD patients over {settings.sites} sites")
        if data_dir.exists():
            shutil.rmtree(data_dir)
        generate_network(
            data_dir, n_sites=settings.sites, n_patients=settings.patients, seed=settings.seed,
            background_ratio=settings.background_ratio,
        )
    else:
        console.print(f"[bold]1/4[/] using the network in {data_dir}")
    shutil.copyfile(data_dir / "truth.json", out / "truth.json")
    timings["generate_data_s"] = round(time.perf_counter() - started, 2)

    specs, workdirs = simulated_sites(
        data_dir / "sites", out / "sites", settings.spark_master, settings.spark_driver_memory
    )

    console.print("[bold]2/4[/] starting Prefect server, SuperLink, and a site agent + SuperNode per site")
    t_start = time.perf_counter()
    with LocalNetwork(
        out / "run", specs, prefect_api_url=settings.prefect_api_url, insecure=settings.insecure_transport,
        start_timeout_s=settings.start_timeout_s or start_timeout_s(settings.sites),
    ) as network:
        timings["start_network_s"] = round(time.perf_counter() - t_start, 2)
        timings["process_startup_s"] = {k: round(v, 2) for k, v in network.startup_seconds.items()}
        console.print(f"    Prefect UI: {network.prefect_api_url.removesuffix('/api')}")
        console.print(f"[bold]3/4[/] running {protocol.study_id} over Flower")
        t_run = time.perf_counter()
        run_config = study_run_config(
            settings.protocol, out, **{"truth-path": str(out / "truth.json")}, **simulation_keys(out / "sites").run_config()
        )
        with PeakMemory(network) as memory, JournalProgress(out, console):
            run = run_and_explain(network.submit_run, run_config, out, out / "run" / "logs")
        timings["study_run_s"] = round(time.perf_counter() - t_run, 2)
        timings["flower_run_id"] = run.run_id
        prefect_api_url = network.prefect_api_url
    timings["peak_rss_bytes"] = {"per_process": memory.per_process, "total": memory.total}

    console.print("[bold]4/4[/] writing the pooled dataset (simulation only) and the summary")
    results: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    n_rows = write_pooled_datasets(protocol, results, workdirs, out / "sim")
    timings["total_s"] = round(time.perf_counter() - started, 2)
    views = [view for view in comparison_views(results) if "error" not in view]
    timings["cohort_s"] = {
        ":".join(filter(None, [view["comparison_id"], s["site_id"]])): s["provenance"]["cohort_seconds"]
        for view in views for s in view["sites"]
    }
    timings["rounds_s"] = {r["name"]: r["seconds"] for view in views for r in view["rounds"]}
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    _print_summary(console, results, truth, timings, out, n_rows)
    url = flow_run_url(prefect_api_url, results)
    if url:
        served = ("served by the Prefect server you passed" if settings.prefect_api_url else
                  "its Prefect server ran only while the network did; pass --prefect-api-url of a Prefect "
                  "server you keep running to browse it afterwards")
        console.print(f"Prefect flow run: {url} ({served})")
    return results


def _print_summary(
    console: Console, results: dict[str, Any], truth: dict[str, Any], timings: dict[str, Any],
    out: Path, n_rows: int,
) -> None:
    for view in comparison_views(results):
        if "error" in view:
            continue
        table = Table(title=f"{view['title']}: cohort per site")
        for column in ("site", "exposed", "comparator", "events exp.", "events comp."):
            table.add_column(column, justify="right")
        for site in view["sites"]:
            table.add_row(site["site_id"], *(f"{site[k]:,}" for k in (
                "n_exposed", "n_comparator", "events_exposed", "events_comparator")))
        console.print(table)
    print_estimates(console, results, truth["hr_conditional"])
    console.print("the crude HR is confounded by design; the propensity-score analyses adjust for it.")
    console.print(f"rounds: {', '.join(f'{name} {seconds:.1f}s' for name, seconds in timings['rounds_s'].items())}")
    startup = timings["process_startup_s"]
    spark_start = max(v for k, v in startup.items() if k.endswith("-service"))
    console.print(
        f"time: data {timings['generate_data_s']}s; network start {timings['start_network_s']}s "
        f"(site agents with Spark {spark_start}s, Prefect {startup.get('prefect-server', 0)}s, "
        f"SuperLink {startup['superlink']}s); cohort on Spark (slowest site) "
        f"{max(timings['cohort_s'].values()):.1f}s, inside round 1; study {timings['study_run_s']}s; "
        f"total {timings['total_s']}s; peak RSS {timings['peak_rss_bytes']['total'] / 2**30:.2f} GiB"
    )
    console.print(_transport_line(startup, out))
    console.print(
        f"wrote {out / 'results.json'}, {out / 'report.html'}, {out / 'truth.json'}, "
        f"{out / 'sim' / 'pooled_analysis_dataset.parquet'} ({n_rows:,} rows, simulation only)"
    )


def _transport_line(startup: dict[str, float], out: Path) -> str:
    """One line saying how the SuperNodes reached the SuperLink, and what it cost at start."""
    if "register-supernodes" not in startup:
        return "transport: INSECURE (plain HTTP, no SuperNode authentication): debugging only"
    return (
        f"transport: TLS (CA in {out / 'run' / 'pki' / 'ca.pem'}) + SuperNode authentication; "
        f"keys {startup.get('pki', 0)}s, key registration {startup['register-supernodes']}s at start"
    )
