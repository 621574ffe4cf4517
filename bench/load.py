"""Load on one machine: many sites in one study, and several studies at once.

Scenario 1 (``many_sites``): ``fedrwe simulate`` with ``--sites`` sites (default 10).
Scenario 2 (``concurrent_studies``): one network (one Prefect server, one SuperLink,
``--concurrent-sites`` sites); the default protocol alone, then ``--studies`` copies of it
(own study ids, own out dirs) submitted at once; each must equal the run alone
(counts exactly, estimates to 1e-8 relative). Prints a table and writes
``bench/results/load.json``.

    .venv/bin/python bench/load.py                       # 10 sites x 15,000; 3 studies on 3 sites
    .venv/bin/python bench/load.py --sites 6 --patients 9000 --scenario many_sites
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flows.load import machine, run_concurrent_studies, run_many_sites  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "load.json"


def print_table(host: dict[str, Any], scenarios: list[dict[str, Any]]) -> None:
    """One row per scenario, then peak RSS per process kind."""
    print(f"machine: {host['cores']} cores, {host['memory_gib']} GiB")
    header = f"{'scenario':<20}{'sites':>6}{'patients':>10}{'studies':>8}{'wall s':>9}{'study s':>9}{'rounds':>8}{'peak RSS MiB':>14}"
    print(header)
    for s in scenarios:
        study_s = s.get("study_s", s.get("together_s"))
        print(
            f"{s['scenario']:<20}{s['sites']:>6}{s['patients']:>10,}{s['studies']:>8}{s['wall_s']:>9}"
            f"{study_s:>9}{s['rounds']:>8}{s['peak_rss']['total_mib']:>14,}"
        )
    for s in scenarios:
        print(f"\n{s['scenario']}: peak RSS per process kind (MiB; a site service includes its Spark JVM)")
        print(f"{'kind':<16}{'processes':>10}{'max one':>10}{'sum':>10}")
        for kind, peak in s["peak_rss"]["per_kind"].items():
            print(f"{kind:<16}{peak['processes']:>10}{peak['max_mib']:>10,}{peak['sum_mib']:>10,}")


def main() -> None:
    """Run the scenarios, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["all", "many_sites", "concurrent_studies"], default="all")
    parser.add_argument("--sites", type=int, default=10, help="sites of scenario 1")
    parser.add_argument("--patients", type=int, default=15_000, help="CUD patients of scenario 1")
    parser.add_argument("--concurrent-sites", type=int, default=3, help="sites of scenario 2")
    parser.add_argument("--concurrent-patients", type=int, default=15_000, help="CUD patients of scenario 2")
    parser.add_argument("--studies", type=int, default=3, help="studies at once in scenario 2")
    parser.add_argument("--driver-memory", default="512m", help="Spark driver memory per site")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    scenarios: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedrwe-load-") as tmp:
        root = args.out or Path(tmp)
        if args.scenario in ("all", "many_sites"):
            scenarios.append(run_many_sites(
                root / "many_sites", sites=args.sites, patients=args.patients, seed=args.seed,
                driver_memory=args.driver_memory,
            ))
        if args.scenario in ("all", "concurrent_studies"):
            scenarios.append(run_concurrent_studies(
                root / "concurrent_studies", sites=args.concurrent_sites, patients=args.concurrent_patients,
                studies=args.studies, seed=args.seed, driver_memory=args.driver_memory,
            ))
    host = machine()
    print_table(host, scenarios)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    ran = {s["scenario"] for s in scenarios}
    if args.json.exists():  # a run of one scenario keeps the other's last figures
        kept = json.loads(args.json.read_text(encoding="utf-8")).get("scenarios", [])
        scenarios = [s for s in kept if s["scenario"] not in ran] + scenarios
    args.json.write_text(json.dumps({"machine": host, "scenarios": scenarios}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
