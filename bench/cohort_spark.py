"""Where a site's cold cohort build spends its time, and which levers cut it.

Every measurement runs in a FRESH Python process (so a fresh, cold JVM), for one site,
driven exactly as the site service drives it: ``SiteAgent(SiteSettings(...))`` then
``agent.handle(<round 1 of studies/ketamine_cud.yaml>)``. Per run it records

  spark start   ``SiteAgent(...)`` (``start_spark``: JVM launch + SparkSession)
  cold build    the first ``handle``: read 6 OMOP tables, cohort + attrition, write the
                analysis dataset (Delta), read it back, event table, Cox partials
  warm build    the same request again on the same JVM with an empty workdir (a rebuild)
  jobs/stages   Spark jobs, executed stages and tasks of the cold build (status store)
  CPU           CPU seconds of the JVM during the cold build (robust to a noisy machine)
  JIT/codegen   HotSpot compiler time and Janino (whole-stage codegen) compile time
  RSS           resident memory of the site process (Python) and its JVM at the end
  results       a hash of the reply (without timings) and of the written analysis
                dataset; every configuration must give the baseline's hashes

Configurations are Spark confs, JVM flags (``spark.driver.extraJavaOptions``) and
"code levers": the change a code lever stands for is applied by monkeypatching in the
worker process only (the project's files are not touched); each is written out below.
Runs are interleaved (repeat r runs every configuration once, in a rotated order) and the
table reports medians.

    .venv/bin/python bench/cohort_spark.py --quick           # baseline vs recommended, ~4 min
    .venv/bin/python bench/cohort_spark.py                   # every configuration, 3 repeats
    .venv/bin/python bench/cohort_spark.py --configs baseline,aqe_off --repeats 5
    .venv/bin/python bench/cohort_spark.py --list

Results (raw runs as JSON lines) go to ``--out`` (default /tmp/fedrwe-bench/runs.jsonl).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "studies" / "ketamine_cud.yaml"
SCRATCH = Path(tempfile.gettempdir()) / "fedrwe-bench"
MARK = "BENCH-RESULT "

# The demo's site settings (flows/simulate.py): local[2], 1g driver, default 8 shuffle partitions.
DEMO_MASTER = "local[2]"
DEMO_DRIVER_MEMORY = "1g"
DEMO_SHUFFLE_PARTITIONS = 8

C1 = "-XX:TieredStopAtLevel=1"
SERIAL_GC = "-XX:+UseSerialGC"
NO_CODEGEN = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}
AQE_OFF = {"spark.sql.adaptive.enabled": "false"}


@dataclass(frozen=True)
class Config:
    """One configuration of the site's Spark session and cohort code."""

    name: str
    what: str
    conf: dict[str, str] = field(default_factory=dict)
    java_options: tuple[str, ...] = ()
    driver_memory: str = DEMO_DRIVER_MEMORY
    shuffle_partitions: int = DEMO_SHUFFLE_PARTITIONS
    levers: tuple[str, ...] = ()  # code levers, see LEVERS
    cds: bool = False  # run with the class-data-sharing archive made by --make-cds


def _recommended(name: str, what: str, **change: Any) -> Config:
    """The recommended set, optionally with one part changed (for leave-one-out runs)."""
    spec: dict[str, Any] = {
        "conf": dict(AQE_OFF), "shuffle_partitions": 1, "java_options": (C1, SERIAL_GC),
        "levers": ("schema",),
    }
    spec.update(change)
    return Config(name, what, **spec)


CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config("baseline", "as the demo runs a site: local[2], 1g, 8 shuffle partitions, AQE on"),
    Config("mem_2g", "driver_memory 2g (the SiteSettings default)", driver_memory="2g"),
    Config("aqe_off", "spark.sql.adaptive.enabled=false", conf=AQE_OFF),
    Config("sp1", "spark.sql.shuffle.partitions=1", shuffle_partitions=1),
    Config("sp2", "spark.sql.shuffle.partitions=2", shuffle_partitions=2),
    Config("sp4", "spark.sql.shuffle.partitions=4", shuffle_partitions=4),
    Config("aqe_off_sp1", "AQE off, 1 shuffle partition", conf=AQE_OFF, shuffle_partitions=1),
    Config("aqe_off_sp2", "AQE off, 2 shuffle partitions", conf=AQE_OFF, shuffle_partitions=2),
    Config("no_broadcast", "spark.sql.autoBroadcastJoinThreshold=-1 (sort-merge joins)",
           conf={"spark.sql.autoBroadcastJoinThreshold": "-1"}),
    Config("no_wholestage", "spark.sql.codegen.wholeStage=false",
           conf={"spark.sql.codegen.wholeStage": "false"}),
    Config("no_codegen", "whole-stage off + codegen.factoryMode=NO_CODEGEN (internal conf)",
           conf=NO_CODEGEN),
    Config("parquet_rowreader", "spark.sql.parquet.enableVectorizedReader=false",
           conf={"spark.sql.parquet.enableVectorizedReader": "false"}),
    Config("files_opencost", "files.openCostInBytes=1m, maxPartitionBytes=512m",
           conf={"spark.sql.files.openCostInBytes": "1048576",
                 "spark.sql.files.maxPartitionBytes": "536870912"}),
    Config("c1", "JVM -XX:TieredStopAtLevel=1 (C1 JIT only)", java_options=(C1,)),
    Config("serialgc", "JVM -XX:+UseSerialGC", java_options=(SERIAL_GC,)),
    Config("c1_serialgc", "JVM C1 only + SerialGC", java_options=(C1, SERIAL_GC)),
    Config("cds", "JVM -XX:SharedArchiveFile (AppCDS of Spark's classes, made by --make-cds)",
           cds=True),
    Config("schema", "code: read parquet with the Delta log's schema (no inference jobs)",
           levers=("schema",)),
    Config("no_cache", "code: no .cache() of the follow-up frame in the builder",
           levers=("no_cache",)),
    Config("arrow_sort", "code: sort by person_id in Arrow after toArrow, not in Spark",
           levers=("arrow_sort",)),
    _recommended("recommended", "C1 + SerialGC, AQE off, 1 shuffle partition, Delta-log schema"),
    _recommended("rec_sp2", "recommended with 2 shuffle partitions", shuffle_partitions=2),
    _recommended("rec_no_wholestage", "recommended + codegen.wholeStage=false",
                 conf={**AQE_OFF, "spark.sql.codegen.wholeStage": "false"}),
    _recommended("rec_no_codegen", "recommended + NO_CODEGEN (internal conf)",
                 conf={**AQE_OFF, **NO_CODEGEN}),
    _recommended("rec_minus_c1", "recommended without C1-only", java_options=(SERIAL_GC,)),
    _recommended("rec_minus_serialgc", "recommended without SerialGC", java_options=(C1,)),
    _recommended("rec_minus_aqe", "recommended with AQE on, 8 partitions", conf={},
                 shuffle_partitions=DEMO_SHUFFLE_PARTITIONS),
    _recommended("rec_minus_schema", "recommended with schema inference", levers=()),
    _recommended("rec_cds", "recommended + AppCDS archive", cds=True),
    _recommended("rec_512m", "recommended with driver_memory 512m", driver_memory="512m"),
    _recommended("rec_2g", "recommended with driver_memory 2g", driver_memory="2g"),
]}
QUICK = ("baseline", "recommended")


# --------------------------------------------------------------------------- code levers
# Each function applies, in the worker process only, the code change the lever stands for.


def _lever_schema() -> None:
    """site_agent/data/delta.py DeltaBackend.read: pass the Delta log's schema to Spark.

    ``spark.read.parquet(*files)`` without a schema launches one Spark job per table to read
    Parquet footers. The Delta log's schemaString *is* Spark's StructType JSON, so the read
    can take it (what delta-spark does); a column missing from the log still fails
    OmopTables.read's required-column check as before.
    """
    from deltalake import DeltaTable
    from pyspark.sql.types import StructType

    from site_agent.data import delta

    original = delta.DeltaBackend.read

    def read(self: Any, name: str, path: Path, schema: Any = None) -> Any:
        if not self.exists(path) or not DeltaTable(str(path)).file_uris():
            return original(self, name, path, schema)
        real_reader = self._spark.read
        log_schema = StructType.fromJson(json.loads(DeltaTable(str(path)).schema().to_json()))

        class _Spark:  # hands DeltaBackend.read a reader that already has the schema
            read = real_reader.schema(log_schema)

        spark, self._spark = self._spark, _Spark()
        try:
            return original(self, name, path, schema)
        finally:
            self._spark = spark

    delta.DeltaBackend.read = read  # type: ignore[method-assign]


def _frame_class() -> Any:
    """The DataFrame class whose methods run (pyspark 4: the classic subclass, not the ABC)."""
    try:
        from pyspark.sql.classic.dataframe import DataFrame
    except ImportError:  # pyspark < 4
        from pyspark.sql import DataFrame
    return DataFrame


@contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _lever_no_cache() -> None:
    """site_agent/cohort/builder.py build_cohort: drop ``.cache()`` on ``followed``."""
    from site_agent.cohort import store

    frame_class = _frame_class()
    original = store.build_cohort

    def build_cohort(protocol: Any, tables: Any) -> Any:
        with _patched(frame_class, "cache", lambda self: self):
            return original(protocol, tables)

    store.build_cohort = build_cohort


def _lever_arrow_sort() -> None:
    """builder.py: no ``orderBy("person_id")``; store.py: ``rows.sort_by("person_id")``."""
    from site_agent.cohort import store

    frame_class = _frame_class()
    original_build, original_write = store.build_cohort, store.DeltaBackend.write_arrow

    def build_cohort(protocol: Any, tables: Any) -> Any:
        with _patched(frame_class, "orderBy", lambda self, *cols: self):
            return original_build(protocol, tables)

    def write_arrow(self: Any, path: Path, data: Any, metadata: dict[str, str]) -> int:
        return original_write(self, path, data.sort_by("person_id"), metadata)

    store.build_cohort = build_cohort
    store.DeltaBackend.write_arrow = write_arrow  # type: ignore[method-assign]


LEVERS: dict[str, Callable[[], None]] = {
    "schema": _lever_schema, "no_cache": _lever_no_cache, "arrow_sort": _lever_arrow_sort,
}


# --------------------------------------------------------------------------- worker


class _Phases:
    """Wall seconds spent inside wrapped functions (cold build only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.enabled = True
        self._depth = 0  # only the outermost wrapped call counts (event_table's toArrow is event_table)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self.enabled and self._depth == 0:
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, attr, timed)


def _jvm_process() -> Any:
    import psutil

    for child in psutil.Process().children(recursive=True):
        if child.name() == "java":
            return child
    raise RuntimeError("no JVM child process found")


def _cpu(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class _JvmCounters:
    """HotSpot JIT, GC and Janino compile totals, read over py4j."""

    def __init__(self, spark: Any) -> None:
        jvm = spark._jvm
        self._mf = jvm.java.lang.management.ManagementFactory
        self._codegen = jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME()

    def read(self) -> dict[str, float]:
        snapshot = self._codegen.getSnapshot()
        return {
            "jit_ms": float(self._mf.getCompilationMXBean().getTotalCompilationTime()),
            "gc_ms": float(sum(gc.getCollectionTime() for gc in self._mf.getGarbageCollectorMXBeans())),
            "classes": float(self._mf.getClassLoadingMXBean().getTotalLoadedClassCount()),
            "codegen_n": float(self._codegen.getCount()),
            "codegen_ms": float(sum(snapshot.getValues())),
        }


def _jobs(spark: Any) -> list[dict[str, Any]]:
    """Every job the JVM has run so far, from Spark's status store."""
    jobs = []
    iterator = spark.sparkContext._jsc.sc().statusStore().jobsList(None).iterator()
    while iterator.hasNext():
        job = iterator.next()
        jobs.append({
            "id": job.jobId(), "name": job.name(), "stages": job.stageIds().size(),
            "skipped_stages": job.numSkippedStages(), "tasks": job.numTasks(),
            "skipped_tasks": job.numSkippedTasks(),
        })
    return sorted(jobs, key=lambda job: job["id"])


def _time_in_jobs(spark: Any) -> dict[str, float]:
    """Seconds inside Spark jobs (submission to completion) and inside their tasks, so far."""
    status = spark.sparkContext._jsc.sc().statusStore()
    in_jobs = 0.0
    jobs = status.jobsList(None).iterator()
    while jobs.hasNext():
        job = jobs.next()
        if job.submissionTime().isDefined() and job.completionTime().isDefined():
            in_jobs += (job.completionTime().get().getTime() - job.submissionTime().get().getTime()) / 1e3
    run_ms = cpu_ns = 0.0
    defaults = (getattr(status, "stageList$default$4")(), getattr(status, "stageList$default$5")())
    stages = status.stageList(None, False, False, *defaults).iterator()
    while stages.hasNext():
        stage = stages.next()
        run_ms += stage.executorRunTime()
        cpu_ns += stage.executorCpuTime()
    return {"jobs_s": round(in_jobs, 3), "task_run_s": round(run_ms / 1e3, 3), "task_cpu_s": round(cpu_ns / 1e9, 3)}


def _job_summary(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for job in jobs:
        kind = job["name"].split(" at ")[0] + " at " + job["name"].split(" at ")[-1].split("/")[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "jobs": len(jobs),
        "stages": sum(j["stages"] - j["skipped_stages"] for j in jobs),
        "tasks": sum(j["tasks"] - j["skipped_tasks"] for j in jobs),
        "by_call_site": kinds,
    }


def _dataset_hash(path: Path) -> tuple[str, bool]:
    """Hash of the stored analysis dataset's schema and rows (in person_id order), and
    whether the stored rows are in person_id order as the builder's ``orderBy`` intends."""
    import numpy as np
    import pandas as pd
    from deltalake import DeltaTable

    table = DeltaTable(str(path)).to_pyarrow_table()
    frame = table.to_pandas()
    stored_sorted = bool(np.all(np.diff(frame["person_id"].to_numpy()) > 0))
    frame = frame.sort_values("person_id", kind="stable").reset_index(drop=True)
    digest = hashlib.sha256(str([(f.name, str(f.type), f.nullable) for f in table.schema]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16], stored_sorted


def _reply_hash(reply: bytes) -> str:
    from shared.protocol.messages import canonical_json, decode_reply

    decoded = decode_reply(reply)
    if decoded.status != "ok":
        raise RuntimeError(f"site replied {decoded.status}: {decoded.error}")
    results = json.loads(json.dumps(decoded.results))
    results.get("provenance", {}).pop("cohort_seconds", None)
    return hashlib.sha256(canonical_json(results)).hexdigest()[:16]


def worker(config: Config, lake: Path, workdir: Path, site_id: str) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns the run's record."""
    started = time.perf_counter()
    import psutil

    from coordinator.plan import StudyPlan
    from shared.protocol.model import load_protocol
    from site_agent import agent as agent_module
    from site_agent.agent import SiteAgent
    from site_agent.cohort import store
    from site_agent.data import delta
    from site_agent.settings import ApprovalSettings, SiteSettings, SparkSettings

    imported = time.perf_counter()
    for lever in config.levers:
        LEVERS[lever]()
    phases = _Phases()
    phases.wrap(delta.DeltaBackend, "read", "read_tables")
    phases.wrap(store, "build_cohort", "plan_and_attrition")
    phases.wrap(_frame_class(), "toArrow", "to_arrow")
    phases.wrap(delta.DeltaBackend, "write_arrow", "write_delta")
    phases.wrap(agent_module, "event_table", "event_table")

    settings = SiteSettings(
        site_id=site_id, lake=lake, workdir=workdir / "cold", approval=ApprovalSettings(mode="auto"),
        spark=SparkSettings(
            master=DEMO_MASTER, driver_memory=config.driver_memory,
            shuffle_partitions=config.shuffle_partitions,
        ),
    )
    payload = StudyPlan(load_protocol(PROTOCOL)).next_request()
    assert payload is not None
    request = payload.to_bytes()

    before_spark = time.perf_counter()
    agent = SiteAgent(settings)
    spark_seconds = time.perf_counter() - before_spark
    jvm = _jvm_process()
    start_cpu_jvm = _cpu(jvm)
    counters = _JvmCounters(agent.spark)
    at_start = counters.read()
    cpu_jvm, cpu_py = _cpu(jvm), _cpu(psutil.Process())

    before_cold = time.perf_counter()
    reply = agent.handle(request)
    cold_seconds = time.perf_counter() - before_cold
    cold_cpu_jvm, cold_cpu_py = _cpu(jvm) - cpu_jvm, _cpu(psutil.Process()) - cpu_py
    after_cold = counters.read()
    cold_jobs = _jobs(agent.spark)
    try:  # auxiliary: Spark's status-store API is internal and may change
        cold_time_in_jobs = _time_in_jobs(agent.spark)
    except Exception as error:
        cold_time_in_jobs = {"error": str(error)[:200]}
    provenance = json.loads(reply)["results"]["provenance"]
    phases.enabled = False

    warm_agent = SiteAgent(settings.model_copy(update={"workdir": workdir / "warm"}), spark=agent.spark)
    before_warm = time.perf_counter()
    warm_reply = warm_agent.handle(request)
    warm_seconds = time.perf_counter() - before_warm
    warm_jobs = _jobs(agent.spark)[len(cold_jobs):]

    dataset = store.DatasetStore.path(agent._store, load_protocol(PROTOCOL).study_id)
    dataset_hash, stored_sorted = _dataset_hash(dataset)
    record = {
        "config": config.name,
        "site": site_id,
        "import_s": round(imported - started, 3),
        "spark_start_s": round(spark_seconds, 3),
        "start_cpu_jvm_s": round(start_cpu_jvm, 3),
        "cold_s": round(cold_seconds, 3),
        "cold_store_s": provenance["cohort_seconds"],
        "warm_s": round(warm_seconds, 3),
        "cold_cpu_jvm_s": round(cold_cpu_jvm, 3),
        "cold_cpu_py_s": round(cold_cpu_py, 3),
        "phases_s": {k: round(v, 3) for k, v in phases.seconds.items()},
        "jvm_at_start": at_start,
        "jvm_cold_delta": {k: after_cold[k] - at_start[k] for k in at_start},
        "cold_jobs": _job_summary(cold_jobs),
        "cold_time_in_jobs": cold_time_in_jobs,
        "warm_jobs": _job_summary(warm_jobs),
        "rss_py_mb": round(psutil.Process().memory_info().rss / 2**20),
        "rss_jvm_mb": round(jvm.memory_info().rss / 2**20),
        "peak_rss_jvm_mb": round(_peak_rss(jvm.pid) / 2**20),
        "reply_hash": _reply_hash(reply),
        "warm_reply_hash": _reply_hash(warm_reply),
        "dataset_hash": dataset_hash,
        "dataset_stored_sorted": stored_sorted,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "jvm_args": [str(a) for a in agent.spark._jvm.java.lang.management.ManagementFactory
                     .getRuntimeMXBean().getInputArguments() if str(a).startswith("-X")],
    }
    agent.close()
    return record


def _run_round(
    config: Config, lakes: list[Path], cds_archive: Path, timeout: float
) -> dict[str, Any]:
    """Run ``worker`` in fresh interpreters (cold JVMs), one per lake, all at once.

    With one lake this is one site's cold build. With several it is what a study's first
    round meets on one machine: every site building at the same time; the round waits for
    the slowest site, so times are the maximum over sites and CPU and memory the sum.
    """
    java = list(config.java_options)
    if config.cds:
        if not cds_archive.exists():
            raise SystemExit(f"{cds_archive} is missing. Fix: run with --make-cds first.")
        java.append(f"-XX:SharedArchiveFile={cds_archive}")
    env = dict(os.environ)
    env["PYSPARK_SUBMIT_ARGS"] = _submit_args(config.conf, java)
    workdir = Path(tempfile.mkdtemp(prefix=f"run-{config.name}-", dir=SCRATCH))
    processes = []
    try:
        for lake in lakes:
            site = lake.parent.name
            processes.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", config.name, "--lake", str(lake),
                 "--workdir", str(workdir / site), "--site", site],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        records = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
            if not lines:
                raise RuntimeError(f"worker {config.name} failed (exit {process.returncode}):\n{stderr[-3000:]}")
            records.append(dict(json.loads(lines[-1][len(MARK):])))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    if len(records) == 1:
        return records[0]
    slowest = dict(max(records, key=lambda r: r["cold_s"]))
    for key in ("spark_start_s", "cold_s", "warm_s"):
        slowest[key] = max(r[key] for r in records)
    for key in ("start_cpu_jvm_s", "cold_cpu_jvm_s", "rss_py_mb", "rss_jvm_mb", "peak_rss_jvm_mb"):
        slowest[key] = sum(r[key] for r in records)
    slowest["site"] = f"{len(records)} sites at once"
    slowest["site_records"] = records
    return slowest


def _submit_args(conf: dict[str, str], java_options: list[str]) -> str:
    import shlex

    args = [f"--conf {shlex.quote(f'{k}={v}')}" for k, v in conf.items()]
    if java_options:
        args.append("--conf " + shlex.quote("spark.driver.extraJavaOptions=" + " ".join(java_options)))
    return " ".join([*args, "pyspark-shell"])


def make_cds_archive(lake: Path, archive: Path) -> None:
    """Dump the classes a cold build loads into a dynamic AppCDS archive (JDK >= 13)."""
    archive.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYSPARK_SUBMIT_ARGS"] = _submit_args({}, [f"-XX:ArchiveClassesAtExit={archive}"])
    workdir = Path(tempfile.mkdtemp(prefix="cds-", dir=SCRATCH))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--worker", "baseline", "--lake", str(lake), "--workdir", str(workdir),
         "--site", lake.parent.name],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    for _ in range(50):  # the JVM writes the archive as it exits, after Python has returned
        if archive.exists():
            break
        time.sleep(0.2)
    size = archive.stat().st_size / 2**20 if archive.exists() else 0
    print(f"CDS archive {archive}: {size:.0f} MiB in {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------- driver


def ensure_data(data: Path, sites: int, patients: int, seed: int) -> list[Path]:
    """The synthetic network (generated once, reused); returns the sites' lakes."""
    from shared.synthetic import generate_network, site_lake

    stamp = data / f".bench-{sites}-{patients}-{seed}"
    if not stamp.exists():
        shutil.rmtree(data, ignore_errors=True)
        generate_network(data, n_sites=sites, n_patients=patients, seed=seed)
        stamp.touch()
    return [site_lake(data, f"site_{n:02d}") for n in range(1, sites + 1)]


def machine() -> dict[str, Any]:
    import psutil
    import pyspark

    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "java": (java.stderr.splitlines() or ["?"])[0],
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def data_size(lake: Path) -> dict[str, tuple[int, int, int]]:
    """Rows, Parquet files and bytes per table of the site's current snapshots."""
    from deltalake import DeltaTable

    from shared.omop import STUDY_TABLES

    sizes = {}
    for name in STUDY_TABLES:
        table = DeltaTable(str(lake / name))
        files = [Path(uri.removeprefix("file://")) for uri in table.file_uris()]
        rows = table.to_pyarrow_dataset().count_rows()
        sizes[name] = (rows, len(files), sum(f.stat().st_size for f in files))
    return sizes


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _hashes(record: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Per site: (reply hash, dataset hash); a warm reply must equal the cold one."""
    sites = record.get("site_records") or [record]
    return {
        r["site"]: (r["reply_hash"] if r["warm_reply_hash"] == r["reply_hash"] else "warm differs",
                    r["dataset_hash"])
        for r in sites
    }


def _sorted_cell(runs: list[dict[str, Any]]) -> str:
    flags = [site.get("dataset_stored_sorted") for run in runs for site in (run.get("site_records") or [run])]
    return "yes" if all(flags) else f"NO ({flags.count(False)}/{len(flags)} unsorted)"


def report(runs: list[dict[str, Any]], names: list[str]) -> str:
    """The table: medians per configuration, and whether results match the baseline."""
    reference: dict[str, tuple[str, str]] = {}
    for run in runs:
        if run["config"] == "baseline":
            for site, hashes in _hashes(run).items():
                reference.setdefault(site, hashes)
    lines = [
        "| config | n | spark start s (JVM CPU) | cold build s | cold JVM CPU s | warm build s | "
        "jobs / stages / tasks (cold) | codegen classes (ms) | JIT ms (cold) | RSS py+JVM MB (JVM peak) | same results | stored sorted | what |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue

        def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return _median([float(r[key]) for r in rows])

        def med_in(group: str, key: str, rows: list[dict[str, Any]] = mine) -> float:
            return _median([float(r[group][key]) for r in rows])

        cold = med("cold_s")
        if name == "baseline":
            base = cold
        delta = f" ({100 * (cold - base) / base:+.0f}%)" if base and name != "baseline" else ""
        same = all(
            reference.get(site) == hashes for r in mine for site, hashes in _hashes(r).items()
        )
        lines.append(
            f"| {name} | {len(mine)} | {med('spark_start_s'):.1f} ({med('start_cpu_jvm_s'):.1f}) | {cold:.1f}{delta} | "
            f"{med('cold_cpu_jvm_s'):.1f} | {med('warm_s'):.1f} | "
            f"{med_in('cold_jobs', 'jobs'):.0f} / {med_in('cold_jobs', 'stages'):.0f} / "
            f"{med_in('cold_jobs', 'tasks'):.0f} | "
            f"{med_in('jvm_cold_delta', 'codegen_n'):.0f} ({med_in('jvm_cold_delta', 'codegen_ms'):.0f}) | "
            f"{med_in('jvm_cold_delta', 'jit_ms'):.0f} | "
            f"{med('rss_py_mb') + med('rss_jvm_mb'):.0f} ({med('peak_rss_jvm_mb'):.0f}) | "
            f"{'yes' if same else 'NO'} | {_sorted_cell(mine)} | {CONFIGS[name].what} |"
        )
    return "\n".join(lines)


def phase_table(runs: list[dict[str, Any]], names: list[str]) -> str:
    keys = ["read_tables", "plan_and_attrition", "to_arrow", "write_delta", "event_table"]
    lines = ["| config | " + " | ".join(keys) + " | (s, cold build, median) |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        if mine:
            cells = [f"{_median([r['phases_s'].get(k, 0.0) for r in mine]):.1f}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, 2 repeats")
    parser.add_argument("--configs", help="comma-separated configuration names (see --list)")
    parser.add_argument("--repeats", type=int, help="runs per configuration (default 3, quick 2)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--parallel", type=int, default=1,
                        help="build this many sites at once, each in its own process (the demo: 3)")
    parser.add_argument("--data", type=Path, default=SCRATCH / "data")
    parser.add_argument("--out", type=Path, default=SCRATCH / "runs.jsonl")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--make-cds", action="store_true", help="(re)make the AppCDS archive first")
    parser.add_argument("--cds-archive", type=Path, default=SCRATCH / "spark-cds.jsa")
    parser.add_argument("--list", action="store_true", help="list the configurations")
    parser.add_argument("--report", type=Path, help="only print the tables of an existing runs file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lake", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--site", default="site_01", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.worker:
        record = worker(CONFIGS[args.worker], args.lake, args.workdir, args.site)
        print(MARK + json.dumps(record), flush=True)
        return 0
    if args.list:
        for config in CONFIGS.values():
            print(f"{config.name:18} {config.what}")
        return 0
    if args.report:
        runs = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        names = list(dict.fromkeys(r["config"] for r in runs))
        print(report(runs, names), "", phase_table(runs, names), sep="\n")
        return 0

    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = sorted(set(names) - set(CONFIGS))
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; see --list")
    else:
        names = list(QUICK) if args.quick else list(CONFIGS)
    if "baseline" not in names:
        names.insert(0, "baseline")
    repeats = args.repeats or (2 if args.quick else 3)

    SCRATCH.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info['cpus']} cores, {info['memory_gib']} GiB, Python {info['python']}, "
          f"pyspark {info['pyspark']}, {info['java']}, load avg {info['load_avg']}")
    if not 1 <= args.parallel <= args.sites:
        parser.error("--parallel must be between 1 and --sites")
    lakes = ensure_data(args.data, args.sites, args.patients, args.seed)[: args.parallel]
    lake = lakes[0]
    sizes = data_size(lake)
    print(f"data: site_01 of {args.sites} sites, {args.patients} CUD patients network-wide (seed {args.seed}): "
          + ", ".join(f"{name} {rows:,} rows/{files} file(s)/{size / 2**20:.1f} MiB"
                      for name, (rows, files, size) in sizes.items()))
    if args.make_cds or (any(CONFIGS[n].cds for n in names) and not args.cds_archive.exists()):
        make_cds_archive(lake, args.cds_archive)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    failures = 0
    total = repeats * len(names)
    with args.out.open("a", encoding="utf-8") as out:
        for repeat in range(repeats):
            order = names[repeat % len(names):] + names[: repeat % len(names)]  # interleaved, rotated
            for name in order:
                try:
                    record = _run_round(CONFIGS[name], lakes, args.cds_archive, args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    failures += 1
                    print(f"[{repeat + 1}] {name}: FAILED: {str(error)[-1500:]}", flush=True)
                    continue
                record.update(repeat=repeat, parallel=args.parallel, machine=info,
                              config_spec=asdict(CONFIGS[name]))
                runs.append(record)
                out.write(json.dumps(record) + "\n")
                out.flush()
                print(f"[{len(runs)}/{total}] {name:18} start {record['spark_start_s']:5.1f}s  "
                      f"cold {record['cold_s']:5.1f}s (JVM CPU {record['cold_cpu_jvm_s']:5.1f}s)  "
                      f"warm {record['warm_s']:4.1f}s  jobs {record['cold_jobs']['jobs']}  "
                      f"RSS {record['rss_py_mb'] + record['rss_jvm_mb']} MB  load {record['load_avg_1m']}",
                      flush=True)
    scope = "one site" if args.parallel == 1 else (
        f"{args.parallel} sites at once: times are the slowest site's, CPU and RSS summed")
    print(f"\nmedians of {repeats} fresh-process run(s) per configuration, {scope}, "
          f"load avg at end {[round(x, 2) for x in os.getloadavg()]}; raw runs in {args.out}\n")
    print(report(runs, names), "", phase_table(runs, names), sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
