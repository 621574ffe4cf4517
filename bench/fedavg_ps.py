"""How many rounds FedAvg needs for the propensity model that exact Newton fits in a few.

fedrwe fits the propensity score (logistic regression of treatment on the protocol's
covariates) by distributed Newton: the sites return gradient and Hessian, and the study
converges in a handful of exchanges. This script trains the same model with FedAvg on the
same rows, split by site as in the study, and counts the rounds until it matches the MLE.

- Data: ``<study-out>/sim/pooled_analysis_dataset.parquet`` and ``<study-out>/results.json``
  of a simulation run (``make demo``). The design is the study's: an intercept, then the
  covariates in the order of results.json's coefficients, unscaled. statsmodels' Logit on
  the pooled rows is checked against results.json's coefficients first.
- FedAvg: each round, every site runs E epochs of local training from the global model on
  its own rows, and the coordinator averages the sites' models weighted by their number
  of rows with Flower's own FedAvg aggregation
  (``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, what
  ``FedAvg.aggregate_train`` calls). Local training is full-batch gradient descent on the
  site's mean log-loss (and one mini-batch SGD setting), on covariates standardised with
  the pooled mean and SD (one extra exchange of sums), as a careful practitioner would;
  the model is mapped back to the unscaled covariates before it is compared.
- Rounds are counted in-process (no Flower processes); wall time is extrapolated as
  rounds x the measured seconds per exchange (bench/results/transport_overhead*.json).

Criterion: relative error = max over coefficients j (intercept included) of
|beta_j - mle_j| / max(|mle_j|, 1e-12), with mle = results.json's coefficients.

    .venv/bin/python bench/fedavg_ps.py --quick             # cap 2,000 rounds, small grid
    .venv/bin/python bench/fedavg_ps.py --study-out out/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, machine, stopwatch, table, write_result  # noqa: E402

Matrix = NDArray[np.float64]
Vector = NDArray[np.float64]
TOLERANCES = (1e-2, 1e-4, 1e-6)
DEFAULT_SECONDS_PER_EXCHANGE = 4.6  # ARCHITECTURE.md, when no transport_overhead result exists
STALL_ROUNDS = 1_000  # stop when the best error has not improved for this many rounds
CHECK_TOLERANCE = 1e-6  # statsmodels vs results.json: both stop Newton at a step below 1e-6 or tighter
GRID = {
    "quick": {"cap": 2_000, "lr": (1.0, 2.0, 4.0), "epochs": (1, 5), "sgd": ((0.05, 64, 1),)},
    "full": {"cap": 20_000, "lr": (0.5, 1.0, 2.0, 4.0, 8.0), "epochs": (1, 2, 5),
             "sgd": ((0.05, 64, 1), (0.01, 256, 1))},
}
WEIGHT_KEY = "num-examples"  # Flower FedAvg's default weighting key


# ---------------------------------------------------------------- the model


def relative_error(beta: Vector, mle: Vector) -> float:
    """max_j |beta_j - mle_j| / max(|mle_j|, 1e-12): the criterion every tolerance refers to."""
    return float(np.max(np.abs(beta - mle) / np.maximum(np.abs(mle), 1e-12)))


def mean_logloss_gradient(design: Matrix, treatment: Vector, beta: Vector) -> Vector:
    """Gradient of the mean negative log-likelihood of a logistic model."""
    p = expit(design @ beta)
    return np.asarray(design.T @ (p - treatment) / design.shape[0])


@dataclass(frozen=True)
class Standardizer:
    """Covariates (not the intercept) centred and scaled by their pooled mean and SD.

    Both come from the sites' sums (count, sum, sum of squares): one more exchange.
    ``to_original`` maps a model on the standardised design back to the raw covariates.
    """

    mean: Vector
    sd: Vector

    @classmethod
    def pooled(cls, designs: Sequence[Matrix]) -> Standardizer:
        """From every site's raw design (intercept first), as the sums would give it."""
        n = sum(d.shape[0] for d in designs)
        total = sum(d[:, 1:].sum(axis=0) for d in designs)
        squares = sum((d[:, 1:] ** 2).sum(axis=0) for d in designs)
        mean = np.asarray(total / n)
        sd = np.sqrt(np.maximum(np.asarray(squares / n) - mean**2, 0.0))
        return cls(mean, np.where(sd > 0, sd, 1.0))

    def apply(self, design: Matrix) -> Matrix:
        """The standardised design (intercept column kept)."""
        return np.column_stack([design[:, 0], (design[:, 1:] - self.mean) / self.sd])

    def to_original(self, beta: Vector) -> Vector:
        """Coefficients on the raw covariates of a model fitted on the standardised ones."""
        slopes = beta[1:] / self.sd
        return np.concatenate([[beta[0] - float(slopes @ self.mean)], slopes])


# ---------------------------------------------------------------- local training


LocalTrainer = Callable[[Matrix, Vector, Vector], Vector]


def full_batch_gd(lr: float, epochs: int) -> LocalTrainer:
    """Local training: ``epochs`` full-batch gradient steps on the site's mean log-loss."""

    def train(design: Matrix, treatment: Vector, beta: Vector) -> Vector:
        for _ in range(epochs):
            beta = beta - lr * mean_logloss_gradient(design, treatment, beta)
        return beta

    return train


def minibatch_sgd(lr: float, batch: int, epochs: int, rng: np.random.Generator) -> LocalTrainer:
    """Local training: ``epochs`` passes of mini-batch SGD (shuffled each epoch, constant lr)."""

    def train(design: Matrix, treatment: Vector, beta: Vector) -> Vector:
        n = design.shape[0]
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, batch):
                rows = order[start:start + batch]
                beta = beta - lr * mean_logloss_gradient(design[rows], treatment[rows], beta)
        return beta

    return train


def flower_fedavg(models: Sequence[Vector], examples: Sequence[int]) -> Vector:
    """The sites' models averaged by Flower's FedAvg aggregation (weighted by examples)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    replies = [
        RecordDict({"arrays": ArrayRecord({"beta": Array(np.asarray(m, dtype=np.float64))}),
                    "metrics": MetricRecord({WEIGHT_KEY: int(n)})})
        for m, n in zip(models, examples, strict=True)
    ]
    return np.asarray(aggregate_arrayrecords(replies, WEIGHT_KEY)["beta"].numpy(), dtype=np.float64)


@dataclass
class FedAvgTrace:
    """What one FedAvg training did: rounds to each tolerance (None: not reached)."""

    setting: str
    cap: int
    rounds_to: dict[float, int | None] = field(default_factory=dict)
    rounds_run: int = 0
    final_error: float = float("inf")
    best_error: float = float("inf")
    diverged: bool = False
    stalled: bool = False
    seconds: float = 0.0
    beta: Vector | None = None


def fedavg(
    sites: Sequence[tuple[Matrix, Vector]],
    mle: Vector,
    train: LocalTrainer,
    *,
    cap: int,
    setting: str = "",
    standardizer: Standardizer | None = None,
    tolerances: Sequence[float] = TOLERANCES,
    stall_rounds: int = STALL_ROUNDS,
    aggregate: Callable[[Sequence[Vector], Sequence[int]], Vector] = flower_fedavg,
) -> FedAvgTrace:
    """Run FedAvg from zero until the relative error to ``mle`` is below the smallest
    tolerance, the model diverges, its best error has not improved for ``stall_rounds``
    rounds (stalled: e.g. client drift or SGD noise), or ``cap`` rounds; count the rounds
    to each tolerance.

    ``sites`` hold the designs training sees (standardised when ``standardizer`` is given:
    then the global model is mapped back with it before it is compared with ``mle``).
    Round r is counted as reached when the model after r aggregations meets the tolerance.
    """
    started = time.perf_counter()
    trace = FedAvgTrace(setting, cap, dict.fromkeys(tolerances))
    examples = [design.shape[0] for design, _ in sites]
    beta = np.zeros(sites[0][0].shape[1])
    smallest = min(tolerances)
    improved_at = 0
    for r in range(1, cap + 1):
        beta = aggregate([train(design, y, beta) for design, y in sites], examples)
        trace.rounds_run = r
        if not np.all(np.isfinite(beta)):
            trace.diverged = True
            trace.final_error = float("inf")
            break
        error = relative_error(standardizer.to_original(beta) if standardizer else beta, mle)
        trace.final_error = error
        if error < trace.best_error:
            trace.best_error, improved_at = error, r
        for tol in tolerances:
            if trace.rounds_to[tol] is None and error <= tol:
                trace.rounds_to[tol] = r
        if error <= smallest:
            break
        if error > 1e6:
            trace.diverged = True
            break
        if r - improved_at >= stall_rounds:
            trace.stalled = True
            break
    trace.beta = standardizer.to_original(beta) if standardizer else beta
    trace.seconds = time.perf_counter() - started
    return trace


# ---------------------------------------------------------------- the study's data


@dataclass(frozen=True)
class StudyPropensity:
    """The pooled rows split by site and what the study's Newton fit reported."""

    columns: list[str]
    sites: dict[str, tuple[Matrix, Vector]]
    mle: Vector
    newton_rounds: int
    newton_exchanges: list[dict[str, Any]]
    rounds: list[dict[str, Any]]


def load_study(study_out: Path) -> StudyPropensity:
    """Read the pooled analysis rows and results.json of a simulation run.

    Raises:
        SystemExit: the files are missing (names the fix: ``make demo`` or ``--study-out``).
    """
    import pandas as pd

    parquet = study_out / "sim" / "pooled_analysis_dataset.parquet"
    results = study_out / "results.json"
    for path in (parquet, results):
        if not path.is_file():
            raise SystemExit(
                f"{path} is missing: this benchmark needs a simulation run's pooled rows and "
                f"results.json. Fix: run `make demo` (writes out/demo), or pass "
                f"--study-out DIR naming a run that has sim/pooled_analysis_dataset.parquet."
            )
    found = json.loads(results.read_text(encoding="utf-8"))
    propensity = found["propensity"]
    columns = list(propensity["coefficients"])
    frame = pd.read_parquet(parquet)
    sites = {}
    for site_id, rows in frame.sort_values(["site_id", "person_id"]).groupby("site_id", sort=True):
        design = np.column_stack([np.ones(len(rows)), *(rows[c].to_numpy(np.float64) for c in columns[1:])])
        sites[str(site_id)] = (design, rows["treatment"].to_numpy(np.float64))
    newton = [r for r in found["rounds"] if r["name"].endswith("-newton")]
    return StudyPropensity(columns, sites, np.array([propensity["coefficients"][c] for c in columns]),
                           int(propensity["newton_rounds"]), newton, list(found["rounds"]))


def statsmodels_check(study: StudyPropensity) -> float:
    """statsmodels' Logit on the pooled rows vs results.json: the relative error (printed)."""
    import statsmodels.api as sm

    design = np.vstack([d for d, _ in study.sites.values()])
    treatment = np.concatenate([y for _, y in study.sites.values()])
    fit = sm.Logit(treatment, design).fit(method="newton", tol=1e-12, maxiter=100, disp=False)
    error = relative_error(np.asarray(fit.params), study.mle)
    print(f"statsmodels Logit on {design.shape[0]:,} pooled rows vs results.json coefficients: "
          f"max relative difference {error:.2e}")
    if error > CHECK_TOLERANCE:
        raise SystemExit(
            f"the pooled statsmodels fit differs from results.json's propensity coefficients by "
            f"{error:.2e} (relative): the rows or the design do not match that run. Fix: pass a "
            "--study-out whose sim/ and results.json come from the same run."
        )
    return error


def seconds_per_exchange(results_dir: Path = RESULTS_DIR) -> tuple[float, str]:
    """Median seconds per exchange (TLS+auth, Prefect on, bare request) last measured here."""
    for name in ("transport_overhead.json", "transport_overhead.quick.json"):
        path = results_dir / name
        if path.is_file():
            summaries = json.loads(path.read_text(encoding="utf-8"))["data"]["summaries"]
            return float(summaries["TLS+auth/0/on"]["median"]), f"bench/results/{name}"
    return DEFAULT_SECONDS_PER_EXCHANGE, "ARCHITECTURE.md (no transport_overhead result here)"


# ---------------------------------------------------------------- the benchmark


def search(study: StudyPropensity, mode: str, rng: np.random.Generator) -> list[FedAvgTrace]:
    """Every setting of the grid on the standardised design."""
    grid = GRID[mode]
    standardizer = Standardizer.pooled([d for d, _ in study.sites.values()])
    sites = [(standardizer.apply(d), y) for d, y in study.sites.values()]
    settings: list[tuple[str, LocalTrainer]] = [
        (f"GD lr={lr:g} E={e}", full_batch_gd(lr, e)) for e in grid["epochs"] for lr in grid["lr"]
    ]
    settings += [(f"SGD lr={lr:g} batch={b} E={e}", minibatch_sgd(lr, b, e, rng)) for lr, b, e in grid["sgd"]]
    traces = []
    for name, train in settings:
        trace = fedavg(sites, study.mle, train, cap=grid["cap"], setting=name, standardizer=standardizer)
        reached = ", ".join(f"{t:g}: {trace.rounds_to[t]}" for t in TOLERANCES)
        print(f"{name:<28} rounds to {reached}; final error {trace.final_error:.2e} "
              f"({trace.rounds_run} rounds, {trace.seconds:.1f} s)")
        traces.append(trace)
    return traces


def best(traces: Sequence[FedAvgTrace]) -> FedAvgTrace:
    """Fewest rounds to the smallest tolerance reached by any setting, then smallest error."""
    def key(t: FedAvgTrace) -> tuple[int, float]:
        for i, tol in enumerate(sorted(TOLERANCES)):
            if t.rounds_to[tol] is not None:
                return (i, float(t.rounds_to[tol] or 0))
        return (len(TOLERANCES), t.final_error)
    return min(traces, key=key)


def reached(trace: FedAvgTrace, tol: float) -> str | int:
    """Rounds to ``tol``, or 'not in N' (the cap, or the rounds run before divergence)."""
    found = trace.rounds_to[tol]
    if found is not None:
        return found
    if trace.diverged:
        return f"diverged at {trace.rounds_run:,}"
    if trace.stalled:
        return f"stalled at {trace.rounds_run:,}"
    return f"not in {trace.cap:,}"


def run(mode: str, study_out: Path) -> Path:
    """Run the comparison in ``quick`` or ``full`` mode on ``study_out``; return the result file."""
    started_machine = machine()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(20261127)
    with stopwatch(timings, "wall"):
        study = load_study(study_out)
        check = statsmodels_check(study)
        traces = search(study, mode, rng)
    top = best(traces)
    per_exchange, source = seconds_per_exchange()
    n_sites = len(study.sites)
    p = len(study.columns)
    fedavg_round_bytes = 8 * p * 2 * n_sites  # the model out and back, float64
    newton_round_bytes = 8 * (p + p + p * (p + 1) // 2 + 1) * n_sites  # beta out; gradient, Hessian, loglik back
    newton_bytes = sum(int(r["bytes_sent"]) + int(r["bytes_received"]) for r in study.newton_exchanges)
    newton_seconds = sum(float(r["seconds"]) for r in study.newton_exchanges)
    grid_rows = [[t.setting, *(reached(t, tol) for tol in TOLERANCES), t.final_error, t.rounds_run]
                 for t in traces]

    def estimate(exchanges: int | None, float64_bytes: int, measured_bytes: int | None) -> list[Any]:
        if exchanges is None:
            return [None, None, None, None]
        return [round(exchanges * per_exchange, 1), round(exchanges * DEFAULT_SECONDS_PER_EXCHANGE, 1),
                exchanges * float64_bytes, measured_bytes]

    compare_rows = [["exact Newton (fedrwe, this study)", "MLE (reference)", study.newton_rounds,
                     study.newton_rounds,
                     *estimate(study.newton_rounds, newton_round_bytes, newton_bytes)]]
    for tol in TOLERANCES:
        rounds = top.rounds_to[tol]
        total = None if rounds is None else rounds + 1  # + the exchange of sums for the scaling
        compare_rows.append([f"FedAvg {top.setting}", tol, reached(top, tol), total,
                             *estimate(total, fedavg_round_bytes, None)])
    tables = [
        table(f"FedAvg rounds to the MLE, by setting ({n_sites} sites, {sum(d.shape[0] for d, _ in study.sites.values()):,} rows, {p} coefficients)",
              ["local training", *(f"rounds to {t:g}" for t in TOLERANCES), "final rel. error", "rounds run"],
              grid_rows,
              "in-process: local training in numpy, aggregation by Flower's FedAvg "
              "(strategy_utils.aggregate_arrayrecords, weighted by num-examples); start at 0; "
              "covariates standardised by the pooled mean/SD; error = max_j |b_j - mle_j| / "
              f"max(|mle_j|, 1e-12) on the raw covariates; cap {GRID[mode]['cap']:,} rounds; stalled: "
              f"no new best error in {STALL_ROUNDS:,} rounds"),
        table("Exact Newton vs the best FedAvg setting (time extrapolated, not measured)",
              ["fit", "rel. error", "rounds", "exchanges", f"est. s at {per_exchange:.2f} s/exchange",
               f"est. s at {DEFAULT_SECONDS_PER_EXCHANGE} s/exchange", "float64 payload bytes",
               "measured bytes"], compare_rows,
              f"Newton: the study's dedicated N-newton rounds (the warm start rides on the summary round, "
              f"the SEs on the adjusted round); they took {newton_seconds:.1f} s in that run, and its measured "
              "bytes are fedrwe's signed JSON. FedAvg exchanges = rounds + 1 (pooled mean/SD). "
              f"Seconds per exchange: {per_exchange:.2f} from {source} (Prefect on, TLS+auth), and "
              f"{DEFAULT_SECONDS_PER_EXCHANGE} as measured on a quiet machine (ARCHITECTURE.md). "
              f"Float64 payload: FedAvg {p} coefficients out and back; Newton {p} out, gradient, "
              f"Hessian (upper triangle) and log-likelihood back; x {n_sites} sites per round"),
    ]
    params = {"study_out": str(study_out), "grid": GRID[mode], "tolerances": list(TOLERANCES),
              "criterion": "max_j |beta_j - mle_j| / max(|mle_j|, 1e-12), raw covariates, mle = results.json",
              "seconds_per_exchange": per_exchange, "seconds_per_exchange_source": source,
              "wall_seconds": timings}
    data = {
        "statsmodels_vs_results_json": check,
        "columns": study.columns,
        "newton": {"rounds": study.newton_rounds, "exchanges": study.newton_exchanges, "bytes": newton_bytes},
        "best": top.setting,
        "traces": [{"setting": t.setting, "rounds_to": {f"{k:g}": v for k, v in t.rounds_to.items()},
                    "rounds_run": t.rounds_run, "final_error": t.final_error, "best_error": t.best_error,
                    "diverged": t.diverged, "stalled": t.stalled, "seconds": round(t.seconds, 2)} for t in traces],
    }
    print(f"wall {timings['wall']:.0f} s")
    return write_result("fedavg_ps", mode, params, tables, data, started_machine)


def main(argv: list[str] | None = None) -> None:
    """Parse ``--quick`` and ``--study-out`` and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, cap 2,000 rounds")
    parser.add_argument("--study-out", type=Path, default=REPO_ROOT / "out" / "demo",
                        help="a simulation run's out dir (default: out/demo, written by `make demo`)")
    args = parser.parse_args(argv)
    run("quick" if args.quick else "full", args.study_out)


if __name__ == "__main__":
    main()
