"""Fast checks of the transport benchmarks' own arithmetic (no Flower processes here).

``bench/fedavg_ps.py``: FedAvg with one full-batch local step is gradient descent on the
pooled mean log-loss, so it must follow that trajectory, reach statsmodels' MLE and count
the rounds at which it crosses each tolerance. ``bench/transport_overhead.py``: its
summary statistics agree with numpy's percentiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm

from bench.fedavg_ps import (
    Standardizer,
    best,
    fedavg,
    flower_fedavg,
    full_batch_gd,
    mean_logloss_gradient,
    minibatch_sgd,
    relative_error,
)
from bench.transport_overhead import overhead, summarize

EXACT = 1e-12  # same arithmetic up to summation order
MLE_TOLERANCE = 1e-6  # the smallest tolerance the benchmark counts rounds to


def logistic_sites(rng: np.random.Generator, sizes: tuple[int, ...] = (300, 200, 150)):
    """Three sites of a logistic model with site-dependent covariate means (not iid)."""
    beta = np.array([-0.5, 0.8, -0.4, 0.3])
    sites = []
    for k, n in enumerate(sizes):
        x = rng.normal(loc=0.3 * k, scale=1.0 + 0.2 * k, size=(n, 3))
        design = np.column_stack([np.ones(n), x])
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(design @ beta)))).astype(float)
        sites.append((design, y))
    return sites


def pooled_mle(sites) -> np.ndarray:
    design = np.vstack([d for d, _ in sites])
    y = np.concatenate([t for _, t in sites])
    return np.asarray(sm.Logit(y, design).fit(method="newton", tol=1e-12, disp=False).params)


def test_flower_fedavg_is_the_example_weighted_mean() -> None:
    models = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.0, 0.5])]
    examples = [10, 30, 60]
    expected = sum(m * n for m, n in zip(models, examples, strict=True)) / 100
    np.testing.assert_allclose(flower_fedavg(models, examples), expected, rtol=EXACT, atol=EXACT)


def test_one_local_step_fedavg_follows_pooled_gradient_descent() -> None:
    sites = logistic_sites(np.random.default_rng(1))
    mle = pooled_mle(sites)
    design = np.vstack([d for d, _ in sites])
    y = np.concatenate([t for _, t in sites])
    lr, rounds = 1.5, 25
    beta, errors = np.zeros(4), []
    for _ in range(rounds):
        beta = beta - lr * mean_logloss_gradient(design, y, beta)
        errors.append(relative_error(beta, mle))
    trace = fedavg(sites, mle, full_batch_gd(lr, 1), cap=rounds, tolerances=(1e-1, 1e-2, 1e-9))
    assert trace.rounds_run == rounds
    assert trace.beta is not None
    np.testing.assert_allclose(trace.beta, beta, rtol=1e-10, atol=EXACT)
    for tol in (1e-1, 1e-2):
        first = next((r + 1 for r, e in enumerate(errors) if e <= tol), None)
        assert trace.rounds_to[tol] == first


def test_fedavg_reaches_the_statsmodels_mle_on_standardised_covariates() -> None:
    sites = logistic_sites(np.random.default_rng(2))
    mle = pooled_mle(sites)
    scale = Standardizer.pooled([d for d, _ in sites])
    scaled = [(scale.apply(d), y) for d, y in sites]
    trace = fedavg(scaled, mle, full_batch_gd(4.0, 1), cap=2_000, standardizer=scale)
    assert not trace.diverged
    assert trace.rounds_to[MLE_TOLERANCE] == trace.rounds_run
    assert trace.final_error <= MLE_TOLERANCE
    assert trace.rounds_to[1e-2] <= trace.rounds_to[1e-4] <= trace.rounds_to[1e-6]
    assert trace.beta is not None
    assert relative_error(trace.beta, mle) <= MLE_TOLERANCE


def test_standardizer_maps_coefficients_back_to_the_raw_covariates() -> None:
    sites = logistic_sites(np.random.default_rng(3))
    scale = Standardizer.pooled([d for d, _ in sites])
    design = np.vstack([d for d, _ in sites])
    np.testing.assert_allclose(scale.apply(design)[:, 1:].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(scale.apply(design)[:, 1:].std(axis=0), 1.0, rtol=1e-12)
    beta_scaled = np.array([0.2, -1.0, 0.5, 2.0])
    raw = scale.to_original(beta_scaled)
    np.testing.assert_allclose(design @ raw, scale.apply(design) @ beta_scaled, rtol=1e-10, atol=1e-12)


def test_divergence_stops_early_and_best_prefers_the_tightest_tolerance() -> None:
    sites = logistic_sites(np.random.default_rng(4))
    mle = pooled_mle(sites)
    blown = fedavg(sites, mle, full_batch_gd(1e5, 3), cap=50, setting="too big")
    assert blown.diverged or blown.rounds_to[MLE_TOLERANCE] is None
    rng = np.random.default_rng(5)
    noisy = fedavg(sites, mle, minibatch_sgd(0.05, 32, 1, rng), cap=30, setting="sgd")
    scale = Standardizer.pooled([d for d, _ in sites])
    good = fedavg([(scale.apply(d), y) for d, y in sites], mle, full_batch_gd(4.0, 1),
                  cap=2_000, setting="good", standardizer=scale)
    assert best([blown, noisy, good]).setting == "good"


def test_relative_error_is_the_largest_coefficientwise_relative_difference() -> None:
    assert relative_error(np.array([1.1, -2.0]), np.array([1.0, -2.0])) == pytest.approx(0.1)
    assert relative_error(np.array([1e-13, 0.0]), np.array([0.0, 0.0])) == pytest.approx(0.1)


def test_summary_statistics_match_numpy_percentiles() -> None:
    values = [4.6, 4.8, 5.1, 4.7, 6.0, 4.9, 4.65, 5.5, 4.75, 4.7]
    s = summarize(values)
    assert s["n"] == 10
    assert s["median"] == pytest.approx(float(np.median(values)))
    assert s["p10"] == pytest.approx(float(np.percentile(values, 10)))
    assert s["p90"] == pytest.approx(float(np.percentile(values, 90)))
    o = overhead([4.0, 5.0, 6.0], [4.5, 5.1, 6.2])
    assert o["difference"] == pytest.approx(0.1)
    assert o["ratio"] == pytest.approx(5.1 / 5.0)

