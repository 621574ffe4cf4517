"""Pooled-baseline Cox from risk-set sums (WebDISCO), federated over k sites vs pooled rows.

The reference is statsmodels' ``PHReg(..., ties=...)`` fitted on the pooled rows (one
baseline hazard, no strata). Data have heavily tied integer times and three covariates
(binary, an age-like one far from 0, a standard normal); they are split over k = 1, 2, 3
and 7 sites, with a tiny site (5 rows) and a site without any event. Every request and
reply goes through ``json`` on its way, as it would on the wire.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from functools import reduce

import numpy as np
import pytest
from numpy.typing import NDArray
from statsmodels.duration.hazard_regression import PHReg

from shared.errors import ConvergenceError, DataError, ProtocolError
from shared.stats.cox_riskset import (
    RiskSetRequest,
    RiskSetSums,
    Ties,
    fit_risk_set_cox,
    risk_set_cox_derivatives,
    site_event_times,
    site_risk_set_sums,
    union_event_times,
)

RELATIVE = 1e-8  # federated vs pooled statsmodels: both exact up to rounding (measured ~1e-14)
CENTRING_INVARIANCE = 1e-10  # same derivatives with and without centring, up to rounding
TIES_MATTER = 1e-3  # Breslow and Efron coefficients differ by more than this on these data
SPLITS = (1, 2, 3, 7)

Rows = tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64]]


def survival_rows(rng: np.random.Generator, n: int = 600) -> Rows:
    """Times in whole weeks (about 40 distinct event times for ~350 events: many ties)."""
    x = np.column_stack([rng.integers(0, 2, n), rng.normal(60, 10, n), rng.normal(size=n)])
    linear = x @ np.array([0.5, 0.03, -0.4])
    event_time = np.ceil(rng.exponential(20 * np.exp(-(linear - linear.mean()))))
    censor_time = rng.integers(1, 45, n).astype(np.float64)
    return np.minimum(event_time, censor_time), event_time <= censor_time, x


def split(event: NDArray[np.bool_], k: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Site of each row. k = 2: the second site has 5 censored rows only (tiny, no events).
    k >= 3: site k - 2 has 30 censored rows only (no events) and site k - 1 has 5 rows."""
    n = len(event)
    site = rng.integers(0, max(k - 2, 1), n) if k > 2 else np.zeros(n, dtype=np.int64)
    censored = rng.permutation(np.flatnonzero(~event))
    if k == 2:
        site[censored[:5]] = 1
    elif k > 2:
        site[censored[:30]] = k - 2
        site[rng.choice(np.setdiff1d(np.arange(n), censored[:30]), 5, replace=False)] = k - 1
    return site


def wire(data: dict[str, object]) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(json.dumps(data))
    return decoded


def federation(rows: Rows, site: NDArray[np.int64], k: int) -> tuple[NDArray[np.float64], Callable[[RiskSetRequest], Sequence[RiskSetSums]]]:
    """Step 1 (the global grid) and the in-process gatherer of step 2."""
    time, event, x = rows
    parts = [(time[site == s], event[site == s], x[site == s]) for s in range(k)]
    grid = union_event_times([np.asarray(wire({"t": site_event_times(t, e).tolist()})["t"]) for t, e, _ in parts])

    def gather(request: RiskSetRequest) -> list[RiskSetSums]:
        received = RiskSetRequest.from_json(wire(request.to_json()))
        return [RiskSetSums.from_json(wire(site_risk_set_sums(t, e, xs, received).to_json())) for t, e, xs in parts]

    return grid, gather


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("k", SPLITS)
def test_federated_equals_pooled_statsmodels_phreg(k: int, ties: Ties) -> None:
    rng = np.random.default_rng(40 + k)
    rows = survival_rows(rng)
    time, event, x = rows
    site = split(event, k, rng)
    if k > 1:
        assert not event[site == (1 if k == 2 else k - 2)].any()  # a site without events
        assert np.sum(site == k - 1) == 5  # a tiny site
    grid, gather = federation(rows, site, k)
    assert len(grid) < event.sum() / 5  # heavily tied

    fit = fit_risk_set_cox(gather, grid, x.shape[1], ties)
    reference = PHReg(time, x, status=event.astype(float), ties=ties).fit()

    np.testing.assert_allclose(fit.coefficients, reference.params, rtol=RELATIVE)
    np.testing.assert_allclose(fit.standard_errors, reference.bse, rtol=RELATIVE)
    np.testing.assert_allclose(fit.covariance, reference.cov_params(), rtol=RELATIVE)
    assert fit.loglik == pytest.approx(reference.llf, rel=RELATIVE)
    assert fit.ties == ties
    assert fit.iterations < 10


def test_breslow_and_efron_differ_on_tied_data() -> None:
    """Guards the test above: with these ties, the wrong method would fail it."""
    rng = np.random.default_rng(41)
    rows = survival_rows(rng)
    grid, gather = federation(rows, np.zeros(len(rows[0]), dtype=np.int64), 1)
    breslow = fit_risk_set_cox(gather, grid, 3, "breslow").coefficients
    efron = fit_risk_set_cox(gather, grid, 3, "efron").coefficients
    assert np.max(np.abs(breslow / efron - 1)) > TIES_MATTER


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_centring_leaves_the_derivatives_unchanged(ties: Ties) -> None:
    rng = np.random.default_rng(42)
    time, event, x = survival_rows(rng)
    grid = union_event_times([site_event_times(time, event)])
    beta = np.array([0.4, 0.02, -0.3])
    plain = risk_set_cox_derivatives(site_risk_set_sums(time, event, x, RiskSetRequest(beta, np.zeros(3), grid)), ties)
    centred = risk_set_cox_derivatives(site_risk_set_sums(time, event, x, RiskSetRequest(beta, x.mean(axis=0), grid)), ties)
    assert centred.loglik == pytest.approx(plain.loglik, rel=CENTRING_INVARIANCE)
    np.testing.assert_allclose(centred.gradient, plain.gradient, rtol=CENTRING_INVARIANCE, atol=1e-9)
    np.testing.assert_allclose(centred.hessian, plain.hessian, rtol=CENTRING_INVARIANCE)


def test_sums_add_elementwise_and_survive_json() -> None:
    rng = np.random.default_rng(43)
    time, event, x = survival_rows(rng, 200)
    grid = union_event_times([site_event_times(time, event)])
    request = RiskSetRequest(np.array([0.1, 0.01, 0.2]), x.mean(axis=0), grid)
    first, second = (site_risk_set_sums(time[s], event[s], x[s], request) for s in (slice(0, 120), slice(120, None)))
    pooled = site_risk_set_sums(time, event, x, request)
    summed = first + second
    for name in ("risk", "risk_x", "risk_xx", "event_risk", "event_risk_x", "event_risk_xx", "event_x"):
        np.testing.assert_allclose(getattr(summed, name), getattr(pooled, name), rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(summed.events, pooled.events)
    assert summed.events.sum() == event.sum()
    again = RiskSetSums.from_json(wire(summed.to_json()))
    for name in ("risk", "risk_xx", "event_risk_xx", "events"):
        np.testing.assert_array_equal(getattr(again, name), getattr(summed, name))
    np.testing.assert_array_equal(again.request.event_times, grid)


def test_sums_for_different_rounds_do_not_add() -> None:
    rng = np.random.default_rng(44)
    time, event, x = survival_rows(rng, 100)
    grid = union_event_times([site_event_times(time, event)])
    one = site_risk_set_sums(time, event, x, RiskSetRequest(np.zeros(3), np.zeros(3), grid))
    other = site_risk_set_sums(time, event, x, RiskSetRequest(np.full(3, 0.1), np.zeros(3), grid))
    with pytest.raises(ProtocolError, match="beta"):
        _ = one + other


def test_event_time_off_the_grid_is_refused() -> None:
    time, event, x = np.array([1.0, 2.0, 3.0]), np.array([True, True, False]), np.zeros((3, 1))
    with pytest.raises(DataError, match=r"\[2\.0\]"):
        site_risk_set_sums(time, event, x, RiskSetRequest(np.zeros(1), np.zeros(1), np.array([1.0])))


def test_separation_ends_in_convergence_error() -> None:
    """Every event has the highest covariate of its risk set: the MLE is infinite."""
    time = np.arange(1.0, 21.0)
    event = np.ones(20, dtype=bool)
    x = (time <= 10).astype(np.float64)[:, None]
    grid = union_event_times([site_event_times(time, event)])
    with pytest.raises(ConvergenceError, match="separates events"):
        fit_risk_set_cox(lambda request: [site_risk_set_sums(time, event, x, request)], grid, 1)


def test_an_overflowing_round_is_halved_and_the_fit_recovers() -> None:
    """A site whose risks overflow (here: forced on round 2) makes the centre halve the step."""
    rng = np.random.default_rng(46)
    rows = survival_rows(rng)
    grid, gather = federation(rows, split(rows[1], 3, rng), 3)
    rounds: list[RiskSetRequest] = []

    def overflowing_once(request: RiskSetRequest) -> list[RiskSetSums]:
        rounds.append(request)
        replies = list(gather(request))
        if len(rounds) == 2:
            replies[0] = dataclasses.replace(replies[0], risk=np.full_like(replies[0].risk, np.inf))
        return replies

    fit = fit_risk_set_cox(overflowing_once, grid, 3, "efron")
    halfway = (rounds[0].beta + rounds[1].beta) / 2
    np.testing.assert_allclose(rounds[2].beta, halfway, rtol=1e-15)
    reference = PHReg(rows[0], rows[2], status=rows[1].astype(float), ties="efron").fit()
    np.testing.assert_allclose(fit.coefficients, reference.params, rtol=RELATIVE)
    np.testing.assert_allclose(fit.standard_errors, reference.bse, rtol=RELATIVE)


def test_no_events_anywhere_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no site has an event"):
        fit_risk_set_cox(lambda request: [], np.zeros(0), 2)


def test_sites_reduce_in_any_order() -> None:
    rng = np.random.default_rng(45)
    rows = survival_rows(rng)
    site = split(rows[1], 3, rng)
    grid, gather = federation(rows, site, 3)
    request = RiskSetRequest(np.array([0.3, 0.01, -0.2]), np.zeros(3), grid)
    replies = gather(request)
    forward = risk_set_cox_derivatives(reduce(lambda a, b: a + b, replies))
    backward = risk_set_cox_derivatives(reduce(lambda a, b: a + b, replies[::-1]))
    assert forward.loglik == pytest.approx(backward.loglik, rel=1e-14)
