"""What Spark costs on one node: the site's cohort extraction, Spark against DuckDB.

One synthetic site (``generate_network(n_sites=1)``) per size, sized by its *event rows*:
condition_occurrence + drug_exposure + visit_occurrence + death (every table's rows are
printed). For the reference protocol (studies/ketamine_cud.yaml) each engine builds the
analysis dataset and its attrition from the same Delta snapshots:

  Spark   the site's own code: ``OmopTables.read`` of the protocol's inputs
          (``study_inputs``), ``build_cohort`` (rule-0 check, attrition, cached follow-up),
          ``dataset.toArrow()``: what ``DatasetStore`` does to build a dataset, without the
          data-quality checks and the Delta write (delta-rs, the same for either engine).
          Session as the demo's site: local[2], 8 shuffle partitions, driver memory 1g.
  DuckDB  bench/duckdb_cohort.py (a benchmark-only re-implementation of the same rules)
          over ``read_parquet`` of the snapshots' files, 2 threads.

Each engine runs in a fresh Python process per repeat: Spark start (JVM + session), cold
extraction (the first in that JVM), warm extraction (the same again, same JVM); DuckDB cold
(a new connection) and warm (the same connection again). Peak RSS is that process tree's
(Python + JVM for Spark). Repeats interleave the engines; tables show medians.

Correctness gate: the DuckDB dataset must equal Spark's, column by column (same names and
types, same persons in the same order, integers and floats exactly equal) and so must the
attrition; otherwise :class:`EnginesDisagree` names the column and a person.

    .venv/bin/python bench/cohort_engines.py --quick    # ~200k and ~1M event rows
    .venv/bin/python bench/cohort_engines.py            # ~1M and ~10M event rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, PeakRSS, machine, mib, stopwatch, table, write_result

PROTOCOL = REPO_ROOT / "studies" / "ketamine_cud.yaml"
SCRATCH = Path(tempfile.gettempdir()) / "fedrwe-bench" / "engines"
EVENT_TABLES = ("condition_occurrence", "drug_exposure", "visit_occurrence", "death")
EVENT_ROWS_PER_PATIENT = 19.2  # measured: 3,000 CUD patients at one site gave 57.6k event rows
SIZES = {"quick": (200_000, 1_000_000), "full": (1_000_000, 10_000_000)}
MASTER, SHUFFLE_PARTITIONS, DRIVER_MEMORY = "local[2]", 8, "1g"  # the demo's site session
DUCKDB_THREADS = 2
MARK = "ENGINES-RESULT "


class EnginesDisagree(AssertionError):
    """DuckDB's analysis dataset (or attrition) differs from the site's Spark one."""


# --------------------------------------------------------------------------- the two engines


def spark_extract(spark: Any, lake: Path, protocol: Any, seconds: dict[str, float] | None = None,
                  site_id: str = "site_01") -> tuple[pa.Table, list[tuple[str, int, int | None, int | None]]]:
    """The site's Spark extraction: read the inputs, build the cohort, collect it as Arrow."""
    from site_agent.cohort.builder import build_cohort
    from site_agent.cohort.inputs import study_inputs
    from site_agent.data.delta import DeltaBackend, OmopTables

    phases: dict[str, float] = {} if seconds is None else seconds
    backend = DeltaBackend(spark, site_id)
    tables = OmopTables(backend, lake, site_id)
    with stopwatch(phases, "read_tables"):
        frames = {name: tables.read(name, columns).frame for name, columns in study_inputs(protocol).items()}
    with stopwatch(phases, "build_cohort"):  # rule-0 check, entry count and attrition jobs
        cohort = build_cohort(protocol, frames)
    try:
        with stopwatch(phases, "to_arrow"):
            rows = cohort.dataset.toArrow()
    finally:
        cohort.release()
    attrition = [(s.step, s.n_persons, s.n_exposed, s.n_comparator) for s in cohort.attrition]
    return rows, attrition


def duckdb_extract(lake: Path, protocol: Any, connection: Any = None) -> tuple[pa.Table, list[tuple[str, int, int | None, int | None]]]:
    """DuckDB's extraction (a new connection unless one is given)."""
    from bench.duckdb_cohort import connect, extract

    result = extract(connection if connection is not None else connect(DUCKDB_THREADS), lake, protocol)
    return result.dataset, result.attrition


def compare(spark_rows: pa.Table, duck_rows: pa.Table, spark_attrition: list[Any], duck_attrition: list[Any],
            what: str = "") -> None:
    """Raise EnginesDisagree unless both datasets and attritions are equal (exactly)."""
    where = f" ({what})" if what else ""
    if spark_rows.column_names != duck_rows.column_names:
        raise EnginesDisagree(f"columns differ{where}: Spark {spark_rows.column_names}, DuckDB {duck_rows.column_names}")
    spark_ids = spark_rows.column("person_id").to_pylist()
    duck_ids = duck_rows.column("person_id").to_pylist()
    if spark_ids != duck_ids:
        only_spark, only_duck = sorted(set(spark_ids) - set(duck_ids)), sorted(set(duck_ids) - set(spark_ids))
        raise EnginesDisagree(
            f"persons differ{where}: Spark {len(spark_ids):,} rows, DuckDB {len(duck_ids):,}; only in Spark "
            f"e.g. {only_spark[:3]}, only in DuckDB e.g. {only_duck[:3]}"
            + ("" if only_spark or only_duck else "; same persons, another order or duplicates")
        )
    for name in spark_rows.column_names:
        left, right = spark_rows.column(name), duck_rows.column(name)
        if left.type != right.type:
            raise EnginesDisagree(f"column {name!r}{where}: Spark type {left.type}, DuckDB type {right.type}")
        if left.equals(right):
            continue
        for person, a, b in zip(spark_ids, left.to_pylist(), right.to_pylist(), strict=True):
            if a != b:
                raise EnginesDisagree(f"column {name!r}{where}: person {person} has {a!r} in Spark, {b!r} in DuckDB")
        raise EnginesDisagree(f"column {name!r}{where}: values differ (nulls) between Spark and DuckDB")
    if [tuple(s) for s in spark_attrition] != [tuple(s) for s in duck_attrition]:
        raise EnginesDisagree(f"attrition differs{where}: Spark {spark_attrition}, DuckDB {duck_attrition}")


# --------------------------------------------------------------------------- workers (fresh processes)


def _protocol() -> Any:
    from shared.protocol.model import load_protocol

    return load_protocol(PROTOCOL)


def spark_worker(lake: Path, out: Path, driver_memory: str) -> dict[str, Any]:
    """Spark start, cold and warm extraction in this fresh process; the cold rows go to ``out``."""
    import psutil

    from bench.cohort_spark import _cpu, _job_summary, _jobs, _jvm_process, _time_in_jobs
    from site_agent.data.spark import start_spark
    from site_agent.settings import SparkSettings

    protocol = _protocol()
    settings = SparkSettings(master=MASTER, driver_memory=driver_memory, shuffle_partitions=SHUFFLE_PARTITIONS)
    python = psutil.Process()
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    python_before = _cpu(python)
    with stopwatch(seconds, "start"):
        spark = start_spark(settings, "fedrwe-bench-engines")
    jvm = _jvm_process()
    cpu["start"] = _cpu(jvm) + _cpu(python) - python_before
    before = _cpu(jvm) + _cpu(python)
    cold_phases: dict[str, float] = {}
    with stopwatch(seconds, "cold"):
        rows, attrition = spark_extract(spark, lake, protocol, cold_phases)
    cpu["cold"] = _cpu(jvm) + _cpu(python) - before
    cold_jobs = _jobs(spark)
    in_jobs: dict[str, Any]
    try:  # Spark's status store is an internal API
        in_jobs = _time_in_jobs(spark)
    except Exception as error:
        in_jobs = {"error": str(error)[:200]}
    warm_phases: dict[str, float] = {}
    before = _cpu(jvm) + _cpu(python)
    with stopwatch(seconds, "warm"):
        warm_rows, warm_attrition = spark_extract(spark, lake, protocol, warm_phases)
    cpu["warm"] = _cpu(jvm) + _cpu(python) - before
    if not warm_rows.equals(rows) or warm_attrition != attrition:
        raise EnginesDisagree("Spark's warm extraction differs from its cold one")
    pq.write_table(rows, out)
    record = {
        "engine": "spark", "start_s": seconds["start"], "cold_s": seconds["cold"], "warm_s": seconds["warm"],
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cold_phases_s": cold_phases, "warm_phases_s": warm_phases,
        "cold_jobs": {k: v for k, v in _job_summary(cold_jobs).items() if k != "by_call_site"},
        "cold_time_in_jobs": in_jobs, "attrition": attrition, "rows": rows.num_rows,
        "driver_memory": driver_memory, "rss_end_mib": mib(psutil.Process().memory_info().rss + jvm.memory_info().rss),
        "load_1m": round(os.getloadavg()[0], 2),
    }
    spark.stop()
    return record


def duckdb_worker(lake: Path, out: Path) -> dict[str, Any]:
    """DuckDB cold (new connection) and warm (same connection) extraction in this fresh process."""
    import psutil

    from bench.cohort_spark import _cpu
    from bench.duckdb_cohort import connect

    protocol = _protocol()
    python = psutil.Process()
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    before = _cpu(python)
    with stopwatch(seconds, "cold"):
        connection = connect(DUCKDB_THREADS)
        rows, attrition = duckdb_extract(lake, protocol, connection)
    cpu["cold"], before = _cpu(python) - before, _cpu(python)
    with stopwatch(seconds, "warm"):
        warm_rows, warm_attrition = duckdb_extract(lake, protocol, connection)
    cpu["warm"] = _cpu(python) - before
    if not warm_rows.equals(rows) or warm_attrition != attrition:
        raise EnginesDisagree("DuckDB's warm extraction differs from its cold one")
    pq.write_table(rows, out)
    connection.close()
    return {"engine": "duckdb", "cold_s": seconds["cold"], "warm_s": seconds["warm"],
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()}, "attrition": attrition,
            "rows": rows.num_rows, "load_1m": round(os.getloadavg()[0], 2)}


def _run_worker(engine: str, lake: Path, out: Path, driver_memory: str, timeout: float) -> dict[str, Any]:
    """Run one worker in a fresh interpreter, sampling its process tree's RSS."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--lake", str(lake),
               "--out", str(out), "--driver-memory", driver_memory]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with PeakRSS(process.pid) as peak:
            stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} worker failed (exit {process.returncode}):\n{stderr[-3000:]}")
    record = dict(json.loads(lines[-1][len(MARK):]))
    record["process_s"] = round(time.perf_counter() - started, 3)
    record["peak_rss_mib"] = mib(peak.total)
    record["peak_rss_by_process_mib"] = {name: mib(v) for name, v in peak.per_name.items()}
    return record


# --------------------------------------------------------------------------- driver


def lake_for(event_rows: int, seed: int, data: Path) -> Path:
    """The one-site lake sized for ``event_rows`` (generated once, then reused)."""
    from bench.cohort_spark import ensure_data

    patients = max(100, round(event_rows / EVENT_ROWS_PER_PATIENT))
    return ensure_data(data / f"patients-{patients}", 1, patients, seed)[0]


def table_rows(lake: Path) -> dict[str, int]:
    """Rows of every table of the lake's current snapshots."""
    from deltalake import DeltaTable

    return {p.name: DeltaTable(str(p)).to_pyarrow_dataset().count_rows()
            for p in sorted(lake.iterdir()) if DeltaTable.is_deltatable(str(p))}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure(targets: tuple[int, ...], repeats: int, seed: int, driver_memory: str, data: Path,
            timeout: float) -> dict[str, Any]:
    """Every size: generate, run both engines ``repeats`` times (interleaved), check equality."""
    sizes = []
    for target in targets:
        lake = lake_for(target, seed, data)
        rows = table_rows(lake)
        events = sum(rows[name] for name in EVENT_TABLES)
        print(f"~{target:,} event rows: {lake} holds {events:,} event rows; "
              + ", ".join(f"{name} {n:,}" for name, n in rows.items()), flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"spark": [], "duckdb": []}
        for repeat in range(repeats):
            order = ("spark", "duckdb") if repeat % 2 == 0 else ("duckdb", "spark")
            outputs = {}
            for engine in order:
                outputs[engine] = SCRATCH / f"{engine}-{lake.parent.parent.parent.name}.parquet"
                record = _run_worker(engine, lake, outputs[engine], driver_memory, timeout)
                runs[engine].append(record)
                print(f"  [{repeat + 1}/{repeats}] {engine:6} " + "  ".join(
                    f"{k} {record[k]:.2f}s" for k in ("start_s", "cold_s", "warm_s") if k in record)
                    + f"  CPU {record['cpu_s']}  peak RSS {record['peak_rss_mib']} MiB  load {record['load_1m']}", flush=True)
            compare(pq.read_table(outputs["spark"]), pq.read_table(outputs["duckdb"]),
                    runs["spark"][-1]["attrition"], runs["duckdb"][-1]["attrition"],
                    f"{events:,} event rows, repeat {repeat + 1}")
        print(f"  equal: {runs['spark'][-1]['rows']:,} persons, every column and the attrition", flush=True)
        sizes.append({"target_event_rows": target, "event_rows": events, "table_rows": rows,
                      "cohort_rows": runs["spark"][-1]["rows"], "lake": str(lake), "runs": runs})
    return {"sizes": sizes}


def tables_of(data: dict[str, Any], driver_memory: str) -> list[dict[str, Any]]:
    """The result tables: data sizes, times and ratios, peak RSS, Spark's cold phases."""
    sizes = data["sizes"]
    names = sorted({name for size in sizes for name in size["table_rows"]})
    size_table = table(
        "Data: rows per table of the one site (current Delta snapshots)",
        ["table", *(f"~{s['target_event_rows']:,} events" for s in sizes)],
        [[name, *(s["table_rows"].get(name, 0) for s in sizes)] for name in names]
        + [["event rows (condition + drug + visit + death)", *(s["event_rows"] for s in sizes)],
           ["analysis dataset rows (cohort)", *(s["cohort_rows"] for s in sizes)]],
        "generate_network(n_sites=1); the event rows are condition_occurrence + drug_exposure + "
        "visit_occurrence + death",
    )
    time_rows, cpu_rows, rss_rows, phase_rows = [], [], [], []
    for s in sizes:
        spark, duck = s["runs"]["spark"], s["runs"]["duckdb"]

        def med(runs: list[dict[str, Any]], key: str) -> float:
            return _median([float(r[key]) for r in runs])

        cold_ratio = med(spark, "cold_s") / med(duck, "cold_s")
        warm_ratio = med(spark, "warm_s") / med(duck, "warm_s")
        time_rows.append([s["event_rows"], med(spark, "start_s"), med(spark, "cold_s"), med(spark, "warm_s"),
                          med(duck, "cold_s"), med(duck, "warm_s"), round(cold_ratio, 2), round(warm_ratio, 2),
                          round((med(spark, "start_s") + med(spark, "cold_s")) / med(duck, "cold_s"), 2)])
        def cpu(runs: list[dict[str, Any]], key: str) -> float:
            return _median([float(r["cpu_s"][key]) for r in runs])

        cpu_rows.append([s["event_rows"], cpu(spark, "start"), cpu(spark, "cold"), cpu(spark, "warm"),
                         cpu(duck, "cold"), cpu(duck, "warm"), round(cpu(spark, "cold") / cpu(duck, "cold"), 2),
                         round(cpu(spark, "warm") / cpu(duck, "warm"), 2)])
        jvm = _median([r["peak_rss_by_process_mib"].get("java", 0) for r in spark])
        rss_rows.append([s["event_rows"], med(spark, "peak_rss_mib"), jvm, med(duck, "peak_rss_mib")])
        phases = ("read_tables", "build_cohort", "to_arrow")
        in_jobs = _median([r["cold_time_in_jobs"].get("jobs_s", float("nan")) for r in spark])
        phase_rows.append([s["event_rows"], *(_median([r["cold_phases_s"][p] for r in spark]) for p in phases),
                           _median([r["cold_jobs"]["jobs"] for r in spark]),
                           _median([r["cold_jobs"]["tasks"] for r in spark]), in_jobs,
                           cpu(spark, "cold"),
                           *(_median([r["warm_phases_s"][p] for r in spark]) for p in phases)])
    repeats = len(sizes[0]["runs"]["spark"]) if sizes else 0
    return [
        size_table,
        table(
            f"Cohort extraction, seconds (median of {repeats} fresh process(es) per engine)",
            ["event rows", "spark start", "spark cold", "spark warm", "duckdb cold", "duckdb warm",
             "cold ratio", "warm ratio", "start+cold ratio"],
            time_rows,
            f"reference protocol studies/ketamine_cud.yaml; Spark {MASTER}, driver memory {driver_memory}, "
            f"{SHUFFLE_PARTITIONS} shuffle partitions; DuckDB {DUCKDB_THREADS} threads; ratios are Spark / "
            "DuckDB; start+cold ratio = (Spark start + cold) / DuckDB cold, the first answer of a fresh process",
        ),
        table(
            "Cohort extraction, CPU seconds (median; robust to a busy machine, unlike wall times)",
            ["event rows", "spark start", "spark cold", "spark warm", "duckdb cold", "duckdb warm",
             "cold ratio", "warm ratio"],
            cpu_rows,
            "Spark: user + system CPU of the Python process and its JVM; DuckDB: of its Python process "
            "(DuckDB's threads included); ratios are Spark / DuckDB",
        ),
        table(
            "Peak RSS, MiB (process tree of the fresh process, whole run: start, cold and warm)",
            ["event rows", "spark (python + JVM)", "of which JVM", "duckdb (python)"], rss_rows,
        ),
        table(
            "Where Spark's cold extraction goes, seconds (median)",
            ["event rows", "read tables", "build_cohort", "toArrow", "jobs", "tasks", "in jobs",
             "CPU", "warm read", "warm build", "warm toArrow"],
            phase_rows,
            "read tables: plans + Parquet schema jobs; build_cohort: rule-0 check, entry count, attrition "
            "(caches the follow-up frame); toArrow: the dataset query; in jobs: wall seconds inside Spark jobs; "
            "CPU: Python + JVM CPU seconds of the cold extraction",
        ),
    ]


def run(mode: str, repeats: int | None = None, seed: int = 11, driver_memory: str = DRIVER_MEMORY,
        data: Path = SCRATCH / "data", timeout: float = 3600.0, targets: tuple[int, ...] | None = None) -> Path:
    """Measure, print and write bench/results/cohort_engines[.quick].json; returns its path."""
    if mode not in SIZES:
        raise ValueError(f"mode must be one of {sorted(SIZES)}, not {mode!r}")
    started = machine()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    targets = targets or SIZES[mode]
    repeats = repeats or 1
    print(f"machine: {started['cores']} cores, {started['memory_gib']} GiB, load average "
          f"{started['load_average_1_5_15']}", flush=True)
    began = time.perf_counter()
    data_out = measure(targets, repeats, seed, driver_memory, data, timeout)
    data_out["wall_s"] = round(time.perf_counter() - began, 1)
    params = {"protocol": str(PROTOCOL.relative_to(REPO_ROOT)), "target_event_rows": list(targets),
              "event_tables": list(EVENT_TABLES), "repeats": repeats, "seed": seed, "spark_master": MASTER,
              "spark_driver_memory": driver_memory, "spark_shuffle_partitions": SHUFFLE_PARTITIONS,
              "duckdb_threads": DUCKDB_THREADS}
    return write_result("cohort_engines", mode, params, tables_of(data_out, driver_memory), data_out,
                        started_machine=started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~200k and ~1M event rows (default ~1M and ~10M)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per engine and size")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--driver-memory", default=DRIVER_MEMORY, help="spark.driver.memory (the demo: 1g)")
    parser.add_argument("--event-rows", help="comma-separated target sizes instead of the mode's")
    parser.add_argument("--data", type=Path, default=SCRATCH / "data", help="where the lakes are generated")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    parser.add_argument("--worker", choices=("spark", "duckdb"), help=argparse.SUPPRESS)
    parser.add_argument("--lake", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "spark":
            record = spark_worker(args.lake, args.out, args.driver_memory)
        else:
            record = duckdb_worker(args.lake, args.out)
        print(MARK + json.dumps(record), flush=True)
        return 0
    targets = tuple(int(t) for t in args.event_rows.split(",")) if args.event_rows else None
    run("quick" if args.quick else "full", args.repeats, args.seed, args.driver_memory, args.data,
        args.timeout, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
