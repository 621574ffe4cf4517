"""Scaling: time against patients per site (10k -> 100k -> 1M) and against sites (2 -> 5 -> 10).

Every point is one whole simulated study, end to end, as ``fedrwe simulate`` runs it
(``flows.load.run_many_sites``): synthetic Delta tables, a Spark site service and a
SuperNode per site, a SuperLink, studies/ketamine_cud.yaml over Flower. One Prefect
server is started first and shared by every point, so its start (~30 s) is not in the
points' network start; it is recorded once (``prefect_start_s``).

Patients: ``patients per site x sites`` CUD patients over the network. The generator
splits them unevenly (``shared.synthetic.model.site_shares``: 0.625/0.375 over 2 sites,
0.5/0.3/0.2 over 3, weights 5, 3, 2, then 2 x 0.8^k beyond), so the tables give the mean
and the largest site; each site also has 25 % background persons and 12 % antidepressant
starters ("persons" counts all three).

Series N: patients per site on a fixed number of sites (default 2: the largest site is
1.25 x the mean, and 1M per site fits in memory as two site JVMs). Series sites: sites at
a fixed 10k patients per site with 512m of Spark driver memory per site (bench/load.py's
setting for 10 sites). A point that fails (out of memory, a timeout) keeps its error in
the table; the other points still run. The fits use the points that ran.

    .venv/bin/python bench/scaling.py --quick                  # a few small points
    .venv/bin/python bench/scaling.py                          # the issue's series (hours)
    .venv/bin/python bench/scaling.py --series n --per-site 10000,100000 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import PeakRSS, machine, mib, stopwatch, table, write_result  # noqa: E402
from coordinator.results import comparison_views  # noqa: E402
from flows.load import memory_by_kind, rounds_of, run_many_sites  # noqa: E402
from flows.localnet import LocalNetwork  # noqa: E402

NAME = "scaling"
ERROR_CHARS = 160  # of a failed point's error in the table (the whole text is in the data)


@dataclass(frozen=True)
class Plan:
    """The points of one run of the benchmark."""

    n_sites: int  # sites of the N series
    per_site: tuple[int, ...]  # CUD patients per site, N series
    n_driver_memory: str | None  # Spark driver memory per site, N series (None: by size)
    sites_list: tuple[int, ...]  # sites, sites series
    sites_per_site: int  # CUD patients per site, sites series
    sites_driver_memory: str
    seed: int = 7


FULL = Plan(n_sites=2, per_site=(10_000, 100_000, 1_000_000), n_driver_memory=None,
            sites_list=(2, 5, 10), sites_per_site=10_000, sites_driver_memory="512m")
# 5k per site at least: at 2k the smallest of 2 sites has fewer than 10 exposed events and
# refuses round 1 (min_cell_count), so the study would run on one site
QUICK = Plan(n_sites=2, per_site=(5_000, 10_000, 20_000), n_driver_memory=None,
             sites_list=(2, 3), sites_per_site=5_000, sites_driver_memory="512m")
PLANS = {"full": FULL, "quick": QUICK}

# Spark driver memory of the N series by patients per site (up to the bound): the sites
# series' 512m for small sites (so their shared point runs once), then more heap.
N_DRIVER_MEMORY = ((20_000, "512m"), (200_000, "1g"), (math.inf, "4g"))


def n_driver_memory(per_site: int) -> str:
    """The N series' driver memory per site for ``per_site`` patients per site."""
    return next(memory for bound, memory in N_DRIVER_MEMORY if per_site <= bound)


@dataclass(frozen=True)
class Point:
    """One simulated study: ``sites`` sites with ``per_site`` CUD patients each on average."""

    sites: int
    per_site: int
    driver_memory: str

    @property
    def patients(self) -> int:
        """CUD patients over the network."""
        return self.sites * self.per_site

    @property
    def label(self) -> str:
        """The point's folder name."""
        return f"{self.sites}sites_{self.per_site}per_site_{self.driver_memory}"


def series_points(plan: Plan, series: str) -> dict[str, list[Point]]:
    """The points of each series asked for (``n``, ``sites`` or ``both``)."""
    found: dict[str, list[Point]] = {}
    if series in ("n", "both"):
        found["n"] = [Point(plan.n_sites, n, plan.n_driver_memory or n_driver_memory(n)) for n in plan.per_site]
    if series in ("sites", "both"):
        found["sites"] = [Point(k, plan.sites_per_site, plan.sites_driver_memory) for k in plan.sites_list]
    return found


@dataclass(frozen=True)
class Fit:
    """Least squares ``y = intercept + slope * x`` and its R squared."""

    slope: float
    intercept: float
    r_squared: float
    points: int


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    """Least squares line through the points (None below two distinct x)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = float(np.sum((ys - intercept - slope * xs) ** 2))
    total = float(np.sum((ys - ys.mean()) ** 2))
    return Fit(float(slope), float(intercept), 1.0 - residual / total if total > 0 else 1.0, len(xs))


def fit_power(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    """Least squares of log y on log x: ``slope`` is the exponent of ``y ~ x^slope``."""
    return fit_line(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)))


def point_figures(timings: dict[str, Any], results: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """A point's figures from its timings.json, results.json and truth.json."""
    sites = list(truth["sites"].values())
    cud = [site["n_cud"] for site in sites]
    views = [view for view in comparison_views(results) if "error" not in view]
    rounds = [r for view in views for r in view["rounds"]]
    peaks = timings["peak_rss_bytes"]
    return {
        "sites_analysed": min((len(view["sites"]) for view in views), default=0),
        "dropped": [d for view in views for d in view.get("participation", {}).get("dropped", [])],
        "cud_mean": round(sum(cud) / len(cud)), "cud_largest": max(cud),
        "persons": sum(s["n_cud"] + s["n_background"] + s["n_antidepressant"] for s in sites),
        "generate_s": timings["generate_data_s"], "start_network_s": timings["start_network_s"],
        "study_s": timings["study_run_s"], "cohort_s": max(timings["cohort_s"].values()),
        "rounds_s": round(sum(timings["rounds_s"].values()), 2), "rounds_s_each": timings["rounds_s"],
        "round_1_s": next(iter(timings["rounds_s"].values()), 0.0),  # the cohort round
        "later_rounds_s": round(sum(list(timings["rounds_s"].values())[1:]), 2),  # Newton, adjusted
        "rounds": rounds_of(results), "total_s": timings["total_s"],
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in rounds),
        "bytes_received": sum(r.get("bytes_received", 0) for r in rounds),
        "peak_rss": memory_by_kind(peaks["per_process"], peaks["total"]),
    }


def measure(point: Point, out: Path, prefect_api_url: str, seed: int,
            start_timeout_s: float | None = None) -> dict[str, Any]:
    """Run one point; its figures, or its error (the run's processes are stopped either way)."""
    record: dict[str, Any] = {"sites": point.sites, "per_site": point.per_site, "patients": point.patients,
                              "driver_memory": point.driver_memory}
    wall: dict[str, float] = {}
    with PeakRSS() as tree, stopwatch(wall, "wall_s"):
        try:
            run_many_sites(out, sites=point.sites, patients=point.patients, seed=seed,
                           driver_memory=point.driver_memory, prefect_api_url=prefect_api_url,
                           start_timeout_s=start_timeout_s)
        except Exception as error:  # a failed point is a result: recorded, and the others run
            record["error"] = f"{type(error).__name__}: {error}"
    record |= wall
    record["tree_peak_rss_mib"] = mib(tree.total)  # this process (generation) and every child
    if "error" not in record:
        read = {name: json.loads((out / name).read_text(encoding="utf-8"))
                for name in ("timings.json", "results.json", "truth.json")}
        record |= point_figures(read["timings.json"], read["results.json"], read["truth.json"])
    return record


HEADERS = (
    "sites", "analysed", "patients/site", "CUD mean/site", "CUD largest site", "persons", "driver mem",
    "generate s", "network start s", "study s", "cohort s (slowest)", "round 1 s", "later rounds s",
    "rounds", "peak RSS MiB", "all processes MiB", "site service max MiB", "SuperNode max MiB", "SuperLink MiB", "sent KiB",
    "received KiB", "wall s", "error",
)


def row(record: dict[str, Any]) -> list[Any]:
    """A point as a table row (a failed point: its size, wall time and error)."""
    kinds = record.get("peak_rss", {}).get("per_kind", {})

    def kind_max(kind: str) -> int | None:
        return kinds[kind]["max_mib"] if kind in kinds else None

    def kib(key: str) -> int | None:
        return round(record[key] / 1024) if key in record else None

    error = record.get("error")
    return [
        record["sites"], record.get("sites_analysed"), record["per_site"], record.get("cud_mean"), record.get("cud_largest"),
        record.get("persons"), record["driver_memory"], record.get("generate_s"), record.get("start_network_s"),
        record.get("study_s"), record.get("cohort_s"), record.get("round_1_s"), record.get("later_rounds_s"),
        record.get("rounds"), record.get("peak_rss", {}).get("total_mib"), record.get("tree_peak_rss_mib"), kind_max("service"), kind_max("supernode"),
        kind_max("superlink"), kib("bytes_sent"), kib("bytes_received"), record.get("wall_s"),
        error[:ERROR_CHARS] if error else "",
    ]


def series_fits(series: str, records: list[dict[str, Any]]) -> dict[str, Fit | None]:
    """The fits of one series over its points that ran: log-log against patients per site
    (N series) or a line against sites (sites series), of study and slowest cohort seconds."""
    ok = [r for r in records if "error" not in r]
    if series == "n":
        x = [r["per_site"] for r in ok]
        return {key: fit_power(x, [r[key] for r in ok]) for key in ("study_s", "cohort_s")}
    x = [r["sites"] for r in ok]
    return {key: fit_line(x, [r[key] for r in ok]) for key in ("study_s", "cohort_s")}


FIT_MODELS = {"n": ("patients per site", "log t = a + b log N", "exponent b"),
              "sites": ("sites", "t = a + b sites", "s per extra site")}


def fit_rows(fits: dict[str, dict[str, Fit | None]]) -> list[list[Any]]:
    """One row per fitted series and time."""
    rows: list[list[Any]] = []
    for series, by_time in fits.items():
        against, model, meaning = FIT_MODELS[series]
        for key, fit in by_time.items():
            time_name = {"study_s": "study s", "cohort_s": "cohort s (slowest site)"}[key]
            if fit is None:
                rows.append([against, time_name, model, None, None, None, None, "fewer than 2 points ran"])
            else:
                rows.append([against, time_name, model, round(fit.slope, 3), round(fit.intercept, 3),
                             round(fit.r_squared, 4), fit.points, meaning])
    return rows


def build_tables(plan: Plan, points: dict[str, list[dict[str, Any]]],
                 fits: dict[str, dict[str, Fit | None]]) -> list[dict[str, Any]]:
    """The result file's tables: one per series, then the fits."""
    notes = {
        "n": (f"N series: {plan.n_sites} sites, CUD patients = patients/site x {plan.n_sites}, split "
              f"unevenly over the sites (CUD largest site). Driver memory per site: "
              + (plan.n_driver_memory or "512m up to 20k/site, 1g up to 200k, 4g beyond") + "."),
        "sites": (f"Sites series: {plan.sites_per_site:,} CUD patients per site on average, split unevenly "
                  f"(site_shares), driver memory {plan.sites_driver_memory} per site."),
    }
    common = ("One whole simulated study per row; analysed: the sites that passed round 1 (a small "
              "site can refuse it: fewer than min_cell_count events); network start excludes the "
              "shared Prefect server. "
              "Cohort s: the slowest site's cohort build (inside round 1); later rounds: the Newton and "
              "adjusted rounds' seconds summed; peak RSS: the network's processes during the study; "
              "all processes: this benchmark's process tree over the whole point (generation, the "
              "Prefect server); sent/received: the coordinator's messages over all rounds.")
    titles = {"n": "Time against patients per site", "sites": "Time against sites"}
    tables = [table(titles[s], HEADERS, [row(r) for r in records], f"{notes[s]} {common}")
              for s, records in points.items()]
    tables.append(table("Fitted slopes (least squares over the points that ran)",
                        ("against", "time", "model", "slope b", "intercept a", "R squared", "points", "slope is"),
                        fit_rows(fits)))
    return tables


def run(mode: str, plan: Plan | None = None, series: str = "both", out: Path | None = None,
        start_timeout_s: float | None = None) -> Path:
    """Run the series of ``mode`` (``quick`` or ``full``, or ``plan``); print and write the result.

    The result file is written again after every point (``"complete": false`` until the last),
    so a long run that is stopped keeps the points it measured.
    """
    plan = plan or PLANS[mode]
    started_machine = machine()
    wanted = series_points(plan, series)
    measured: dict[Point, dict[str, Any]] = {}
    params: dict[str, Any] = {"series": series, **asdict(plan), "protocol": "studies/ketamine_cud.yaml",
                              "start_timeout_s": start_timeout_s}
    with tempfile.TemporaryDirectory(prefix="fedrwe-scaling-") as tmp:
        root = (out or Path(tmp)).resolve()
        with LocalNetwork(root / "prefect", [], insecure=True) as prefect:
            params["prefect_start_s"] = round(prefect.startup_seconds.get("prefect-server", 0.0), 1)
            pending = list(dict.fromkeys(p for points in wanted.values() for p in points))
            for i, point in enumerate(pending, start=1):
                folder = root / point.label
                print(f"point {i}/{len(pending)} {point.label}: {point.patients:,} CUD patients", flush=True)
                record = measure(point, folder, prefect.prefect_api_url, plan.seed, start_timeout_s)
                measured[point] = record | {"load_average_1_5_15": machine()["load_average_1_5_15"]}
                if out is None:
                    shutil.rmtree(folder, ignore_errors=True)  # a large point's data is gigabytes
                if i < len(pending):
                    write_points(mode, plan, wanted, measured, params | {"complete": False}, started_machine)
    return write_points(mode, plan, wanted, measured, params | {"complete": True}, started_machine)


def write_points(mode: str, plan: Plan, wanted: dict[str, list[Point]], measured: dict[Point, dict[str, Any]],
                 params: dict[str, Any], started_machine: dict[str, Any]) -> Path:
    """Print and write the result of the points measured so far."""
    points = {s: [measured[p] for p in ps if p in measured] for s, ps in wanted.items()}
    fits = {s: series_fits(s, records) for s, records in points.items()}
    data = {"points": points,
            "fits": {s: {k: asdict(f) if f else None for k, f in by.items()} for s, by in fits.items()}}
    return write_result(NAME, mode, params, build_tables(plan, points, fits), data, started_machine)


def numbers(text: str) -> tuple[int, ...]:
    """``10000,100000`` as integers."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def main() -> None:
    """Parse the options, run the series, print the tables, write the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small points (minutes)")
    parser.add_argument("--series", choices=["n", "sites", "both"], default="both")
    parser.add_argument("--per-site", type=numbers, help="N series: CUD patients per site, e.g. 10000,100000")
    parser.add_argument("--n-sites", type=int, help="N series: sites")
    parser.add_argument("--n-driver-memory", help="N series: Spark driver memory per site (default: by size)")
    parser.add_argument("--sites-list", type=numbers, help="sites series: sites, e.g. 2,5,10")
    parser.add_argument("--sites-per-site", type=int, help="sites series: CUD patients per site")
    parser.add_argument("--sites-driver-memory", help="sites series: Spark driver memory per site")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--start-timeout", type=float,
                        help="seconds each process may take to become ready (default: the project's rule)")
    parser.add_argument("--out", type=Path, help="keep every point's run here (default: a temp dir, removed)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    chosen = {"per_site": args.per_site, "n_sites": args.n_sites, "n_driver_memory": args.n_driver_memory,
              "sites_list": args.sites_list, "sites_per_site": args.sites_per_site,
              "sites_driver_memory": args.sites_driver_memory, "seed": args.seed}
    overrides = {k: v for k, v in chosen.items() if v is not None}
    plan = replace(PLANS[mode], **overrides)
    # points other than a mode's own series go to scaling.custom.json, never over its results
    run(mode if not overrides and args.series == "both" else "custom", plan, args.series, args.out,
        args.start_timeout)


if __name__ == "__main__":
    main()
