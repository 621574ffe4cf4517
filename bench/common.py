"""What every benchmark shares: the machine and versions, tables, peak memory, result files.

Each benchmark script prints its tables and writes ``bench/results/<name>.json``:

    {"benchmark": name, "mode": "quick"|"full", "date": ISO UTC, "machine": {...},
     "versions": {...}, "params": {...}, "tables": [{"title", "headers", "rows", "note"}],
     "data": {...}}

``bench/render_docs.py`` turns those files into the tables of docs/benchmarks.md, so the
document always shows what the scripts last measured and on which machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from coordinator.results import software_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PACKAGES = (
    "flwr", "prefect", "pyspark", "delta-spark", "deltalake", "duckdb", "pandas", "numpy",
    "scipy", "statsmodels", "lifelines", "scikit-learn", "cryptography",
)


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, OS and the load average when asked (a busy box inflates times)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def java_version() -> str:
    """The first line of ``java -version`` (Spark's JVM), or 'missing'."""
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else "unknown"


def git_revision() -> str:
    """The commit the benchmark ran at (with '+dirty' when the tree had changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    """fedrwe's commit, Python, Java and the packages the figures depend on."""
    return {"fedrwe": git_revision(), "java": java_version(), **software_versions(PACKAGES)}


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> dict[str, Any]:
    """One table of a result file (cells are kept as given: numbers stay numbers in the JSON)."""
    return {"title": title, "headers": list(headers), "rows": [list(r) for r in rows], "note": note}


def cell(value: Any) -> str:
    """How a table cell is printed: thousands separators, at most 4 significant decimals."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(spec: dict[str, Any]) -> str:
    """A table as aligned plain text (what the scripts print)."""
    headers = spec["headers"]
    rows = [[cell(v) for v in row] for row in spec["rows"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [spec["title"], "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    if spec.get("note"):
        lines.append(f"  note: {spec['note']}")
    return "\n".join(lines)


def markdown_table(spec: dict[str, Any]) -> str:
    """A table as Markdown (what docs/benchmarks.md shows)."""
    headers = spec["headers"]
    lines = [f"**{spec['title']}**", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in spec["rows"]]
    if spec.get("note"):
        lines += ["", spec["note"]]
    return "\n".join(lines)


def write_result(name: str, mode: str, params: dict[str, Any], tables: list[dict[str, Any]],
                 data: dict[str, Any], started_machine: dict[str, Any] | None = None,
                 results_dir: Path = RESULTS_DIR) -> Path:
    """Print the tables and write ``<results_dir>/<name>.json`` (quick runs: ``<name>.quick.json``)."""
    for spec in tables:
        print()
        print(format_table(spec))
    payload = {
        "benchmark": name,
        "mode": mode,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": started_machine or machine(),
        "machine_at_end": machine(),
        "versions": versions(),
        "params": params,
        "tables": tables,
        "data": data,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / (f"{name}.json" if mode == "full" else f"{name}.{mode}.json")
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path


@contextmanager
def stopwatch(into: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall seconds of the block as ``into[key]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        into[key] = round(time.perf_counter() - started, 3)


class PeakRSS:
    """Samples the resident memory of a process (default: this one), with its children unless
    ``children=False``, every 0.5 s; keeps the peak of the whole and of each process by name."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.5, children: bool = True) -> None:
        self._root = psutil.Process(pid or os.getpid())
        self._interval = interval_s
        self._children = children
        self.total = 0
        self.per_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """One sample (also called by the thread)."""
        total = 0
        try:
            processes = [self._root, *(self._root.children(recursive=True) if self._children else [])]
        except psutil.Error:
            return
        for proc in processes:
            try:
                rss = proc.memory_info().rss
                name = proc.name()
            except psutil.Error:
                continue
            total += rss
            self.per_name[name] = max(self.per_name.get(name, 0), rss)
        self.total = max(self.total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)


def mib(n_bytes: int | float) -> int:
    """Bytes as whole MiB."""
    return round(n_bytes / 2**20)
