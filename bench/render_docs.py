"""Write the measured tables of docs/benchmarks.md from bench/results/*.json.

The prose of docs/benchmarks.md is written by hand; everything between the markers
``<!-- measured:begin -->`` and ``<!-- measured:end -->`` is replaced by this script with
each benchmark's latest tables, its date, mode, machine and versions. A full run's file
(``<name>.json``) is shown when it exists, else the quick one (``<name>.quick.json``).

    .venv/bin/python bench/render_docs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, markdown_table  # noqa: E402

DOC = REPO_ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
ORDER = ("paper_scale", "fedavg_ps", "transport_overhead", "scaling", "cohort_engines")
TITLES = {
    "paper_scale": "1-3. Paper-scale network, federated vs pooled, rounds and bytes (bench/paper_scale.py)",
    "fedavg_ps": "3. Exact Newton vs FedAvg propensity model (bench/fedavg_ps.py)",
    "transport_overhead": "6. Transport overhead per exchange, Prefect on vs off (bench/transport_overhead.py)",
    "scaling": "4. Scaling with patients per site and with sites (bench/scaling.py)",
    "cohort_engines": "5. Cohort extraction: Spark vs DuckDB on one node (bench/cohort_engines.py)",
}
MAIN_VERSIONS = ("fedrwe", "python", "java", "flwr", "prefect", "pyspark", "delta-spark", "deltalake", "duckdb")


def latest(name: str, results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The full run's result if there is one, else the quick run's, else None."""
    for path in (results_dir / f"{name}.json", results_dir / f"{name}.quick.json"):
        if path.is_file():
            result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return result
    return None


def section(name: str, result: dict[str, Any]) -> str:
    """One benchmark's heading, provenance lines and tables."""
    m, end = result["machine"], result.get("machine_at_end", {})
    versions = ", ".join(f"{k} {result['versions'].get(k, '?')}" for k in MAIN_VERSIONS)
    load = m.get("load_average_1_5_15", ["?"])[0]
    load_end = end.get("load_average_1_5_15", ["?"])[0]
    lines = [
        f"### {TITLES.get(name, name)}",
        "",
        f"- run: {result['date']}, mode **{result['mode']}**, parameters `{json.dumps(result['params'], sort_keys=True)}`",
        f"- machine: {m['cores']} cores ({m.get('cpu', '?')}), {m['memory_gib']} GiB, {m.get('os', '?')}; "
        f"load average (1 min) {load} at start, {load_end} at end",
        f"- versions: {versions}",
        "",
    ]
    for spec in result["tables"]:
        lines += [markdown_table(spec), ""]
    return "\n".join(lines)


def render(doc: Path = DOC, results_dir: Path = RESULTS_DIR) -> str:
    """The document with its measured part rewritten; raises if the markers are missing."""
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {BEGIN} ... {END}. Fix: add them where the tables go.")
    sections = []
    for name in ORDER:
        result = latest(name, results_dir)
        sections.append(section(name, result) if result else
                        f"### {TITLES[name]}\n\nNot measured yet: run `make bench` or `make bench-full`.\n")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + "\n".join(sections) + END + tail


def main() -> None:
    """Rewrite docs/benchmarks.md in place."""
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
