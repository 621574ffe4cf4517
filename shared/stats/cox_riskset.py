"""Pooled-baseline Cox model across sites, exact, from risk-set sums (WebDISCO design).

One baseline hazard for all sites (not site-stratified), as if the rows were pooled;
Lu et al. (2015), "WebDISCO: a web service for distributed Cox model learning without
patient-level data sharing", JAMIA 22(6):1212-1219. Two exchanges, named alike on both
sides:

1. :func:`site_event_times` (site) -> :func:`union_event_times` (centre): the global,
   sorted grid of distinct event times. In this design the sites' event times leave the
   site; whether a site's policy lets an event-time table leave is the disclosure guard's
   concern, not this module's.
2. Per Newton round, :func:`site_risk_set_sums` (site) at a :class:`RiskSetRequest`
   (``beta``, ``centre``, grid) -> :class:`RiskSetSums`, summed over sites elementwise
   on the common grid (``+``) -> :func:`risk_set_cox_derivatives` (centre) ->
   :func:`~shared.stats.cox.newton_step`. :func:`fit_risk_set_cox` runs the rounds.

With ``r = exp((x - c)'b)`` the sums per grid time t are, over the rows still at risk
(time >= t): ``S0 = sum r``, ``S1 = sum r x``, ``S2 = sum r x x'``; and over the events at
exactly t: their count ``d`` and ``E0, E1, E2``, the same sums (Efron needs them). Ties:
Breslow uses ``S0`` for all d events at t; Efron removes the share ``l/d`` of the tied
events' risk for the l-th of them, ``S0 - (l/d) E0``, l = 0..d-1.

Centring: covariates enter as ``x - c`` for a centre vector ``c`` sent with ``beta``. All
risks are scaled by the same ``exp(-c'b)``, which cancels in every ratio; in the log
partial likelihood the ``-d c'b`` of the event sums cancels the ``+d c'b`` of the log
risk sums. So the fit (loglik, gradient, Hessian) is unchanged; centring only keeps
``exp`` far from overflow and ``S2/S0 - m m'`` free of cancellation. The centre takes it
from the first round (at ``beta = 0``, where no centring is needed): the covariate mean of
the first risk set, ``S1/S0`` at the first grid time -- nothing the sites did not send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from shared.errors import ConvergenceError, DataError, ProtocolError
from shared.stats.cox import CoxDerivatives, newton_step

FloatArray = NDArray[np.float64]
Ties = Literal["breslow", "efron"]


def site_event_times(time: FloatArray, event: NDArray[np.bool_]) -> FloatArray:
    """Site partial 1: the site's distinct event times, sorted (empty if it has no events)."""
    return np.unique(np.asarray(time, dtype=np.float64)[np.asarray(event, dtype=bool)])


def union_event_times(site_times: Sequence[FloatArray]) -> FloatArray:
    """Central step 1: the union of the sites' event times, sorted: the global grid."""
    if not site_times:
        return np.zeros(0)
    return np.unique(np.concatenate([np.asarray(t, dtype=np.float64) for t in site_times]))


@dataclass(frozen=True)
class RiskSetRequest:
    """What the centre sends for one round: coefficients, centre vector and global grid."""

    beta: FloatArray
    centre: FloatArray
    event_times: FloatArray

    def to_json(self) -> dict[str, object]:
        """Plain lists, for the wire."""
        return {k: getattr(self, k).tolist() for k in ("beta", "centre", "event_times")}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> RiskSetRequest:
        """Inverse of :meth:`to_json`."""
        arrays = [np.asarray(data[k], dtype=np.float64) for k in ("beta", "centre", "event_times")]
        return cls(*arrays)


_ARRAYS = ("risk", "risk_x", "risk_xx", "event_risk", "event_risk_x", "event_risk_xx", "event_x")


@dataclass(frozen=True)
class RiskSetSums:
    """One site's (or the summed) risk-set sums at ``request`` on the global grid of m times.

    ``risk`` (m,), ``risk_x`` (m, p), ``risk_xx`` (m, p, p): S0, S1, S2 over rows at risk;
    ``events`` (m,): d; ``event_risk*``: E0, E1, E2 over the events at each time;
    ``event_x`` (p,): the sum of ``x - centre`` over all events.
    """

    request: RiskSetRequest
    risk: FloatArray
    risk_x: FloatArray
    risk_xx: FloatArray
    events: NDArray[np.int64]
    event_risk: FloatArray
    event_risk_x: FloatArray
    event_risk_xx: FloatArray
    event_x: FloatArray

    def __add__(self, other: RiskSetSums) -> RiskSetSums:
        """Elementwise sum on the common grid; refuses replies to different requests."""
        mine, theirs = self.request, other.request
        for name in ("beta", "centre", "event_times"):
            if not np.array_equal(getattr(mine, name), getattr(theirs, name)):
                raise ProtocolError(
                    f"risk-set sums answer different requests ({name} "
                    f"{getattr(mine, name).tolist()[:5]} vs {getattr(theirs, name).tolist()[:5]}). "
                    "Fix: sum only the replies to the same round."
                )
        summed = {k: getattr(self, k) + getattr(other, k) for k in _ARRAYS}
        return RiskSetSums(mine, events=self.events + other.events, **summed)

    def to_json(self) -> dict[str, object]:
        """Plain lists (the request included), for the wire."""
        data: dict[str, object] = {k: getattr(self, k).tolist() for k in _ARRAYS}
        return {**data, "request": self.request.to_json(), "events": self.events.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> RiskSetSums:
        """Inverse of :meth:`to_json`; shapes come from the request."""
        request = RiskSetRequest.from_json(data["request"])  # type: ignore[arg-type]
        m, p = len(request.event_times), len(request.beta)
        shapes = {"risk": (m,), "risk_x": (m, p), "risk_xx": (m, p, p), "event_risk": (m,),
                  "event_risk_x": (m, p), "event_risk_xx": (m, p, p), "event_x": (p,)}
        arrays = {k: np.asarray(data[k], dtype=np.float64).reshape(s) for k, s in shapes.items()}
        events = np.asarray(data["events"], dtype=np.int64).reshape(m)
        return cls(request, events=events, **arrays)


def _bincount(index: NDArray[np.intp], weights: FloatArray, size: int) -> FloatArray:
    return np.bincount(index, weights, minlength=size).astype(np.float64)


def _sums_by_index(
    index: NDArray[np.intp], risk: FloatArray, x: FloatArray, size: int
) -> list[FloatArray]:
    """Sum r, r x and r x x' per index value (bincount: no rows-by-p-by-p array)."""
    p = x.shape[1]
    rx = risk[:, None] * x
    s1 = np.zeros((size, p))
    s2 = np.zeros((size, p, p))
    for a in range(p):
        s1[:, a] = _bincount(index, rx[:, a], size)
        for b in range(a + 1):
            s2[:, a, b] = s2[:, b, a] = _bincount(index, rx[:, a] * x[:, b], size)
    return [_bincount(index, risk, size), s1, s2]


def site_risk_set_sums(
    time: FloatArray, event: NDArray[np.bool_], covariates: FloatArray, request: RiskSetRequest
) -> RiskSetSums:
    """Site partial 2: risk-set and tied-event sums at ``request`` over the site's rows."""
    grid, beta = request.event_times, request.beta
    t = np.asarray(time, dtype=np.float64)
    d = np.asarray(event, dtype=bool)
    x = np.asarray(covariates, dtype=np.float64).reshape(len(t), -1)
    if x.shape[1] != len(beta) or len(request.centre) != len(beta):
        raise ProtocolError(
            f"the request has {len(beta)} coefficients and {len(request.centre)} centres but the "
            f"site has {x.shape[1]} covariates. Fix: send one coefficient per covariate column."
        )
    on_grid = np.searchsorted(grid, t[d])
    if np.any(on_grid >= len(grid)) or np.any(grid[np.minimum(on_grid, len(grid) - 1)] != t[d]):
        missing = np.setdiff1d(t[d], grid)
        raise DataError(
            f"event times {missing[:5].tolist()} are not on the global event-time grid. "
            "Fix: rebuild the grid from every site's event times (step 1) before this round."
        )
    x = x - request.centre
    m = len(grid)
    # Row i is at risk at grid time j iff grid[j] <= t_i, i.e. j < number of grid times <= t_i.
    exits = np.searchsorted(grid, t, side="right")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: a non-finite loglik centrally
        risk = np.exp(x @ beta)
        by_exit = _sums_by_index(exits, risk, x, m + 1)
        s0, s1, s2 = (np.cumsum(s[::-1], axis=0)[::-1][1:] for s in by_exit)
        e0, e1, e2 = _sums_by_index(on_grid, risk[d], x[d], m)
    events = np.bincount(on_grid, minlength=m).astype(np.int64)
    return RiskSetSums(
        request, risk=s0, risk_x=s1, risk_xx=s2, events=events,
        event_risk=e0, event_risk_x=e1, event_risk_xx=e2, event_x=x[d].sum(axis=0),
    )


def risk_set_cox_derivatives(total: RiskSetSums, ties: Ties = "efron") -> CoxDerivatives:
    """Central step 2: log partial likelihood, gradient and Hessian from the summed sums.

    Per grid time the d tied events contribute, for l = 0..d-1, the ratios of
    ``S - f E`` with ``f = l/d`` (Efron) or ``f = 0`` (Breslow); the per-event terms are
    summed as per-time weights on S and E, so nothing is events-by-p-by-p.
    """
    if ties not in ("breslow", "efron"):
        raise ProtocolError(
            f"ties={ties!r} is not a Cox ties method. Fix: use 'breslow' or 'efron'."
        )
    d = total.events
    time_of = np.repeat(np.arange(len(d)), d)
    rank = np.arange(len(time_of)) - np.repeat(np.cumsum(d) - d, d)
    f = rank / d[time_of] if ties == "efron" else np.zeros(len(time_of))
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = total.risk[time_of] - f * total.event_risk[time_of]
        inv, inv2 = 1.0 / denom, 1.0 / denom**2
        loglik = float(total.request.beta @ total.event_x - np.sum(np.log(denom)))

    def per_time(weights: FloatArray) -> FloatArray:
        return _bincount(time_of, weights, len(d))

    a, b = per_time(inv), per_time(f * inv)
    c, e, g = per_time(inv2), per_time(f * inv2), per_time(f * f * inv2)
    s1, e1 = total.risk_x, total.event_risk_x
    gradient = total.event_x - (a @ s1 - b @ e1)
    outer_se = np.einsum("j,ja,jb->ab", e, s1, e1)
    second = (
        np.einsum("j,jab->ab", a, total.risk_xx) - np.einsum("j,jab->ab", b, total.event_risk_xx)
        - np.einsum("j,ja,jb->ab", c, s1, s1) + outer_se + outer_se.T
        - np.einsum("j,ja,jb->ab", g, e1, e1)
    )
    return CoxDerivatives(loglik, gradient, -second)


@dataclass(frozen=True)
class RiskSetCoxFit:
    """A converged pooled-baseline Cox fit."""

    coefficients: FloatArray
    standard_errors: FloatArray
    covariance: FloatArray  # inverse observed information at ``coefficients``
    loglik: float
    iterations: int  # rounds of site partial 2
    ties: Ties


def _covariance(derivatives: CoxDerivatives) -> FloatArray | None:
    try:
        covariance = np.linalg.inv(-derivatives.hessian).astype(np.float64)
    except np.linalg.LinAlgError:
        return None
    diagonal = np.diag(covariance)
    return covariance if np.all(np.isfinite(diagonal)) and np.all(diagonal > 0) else None


def fit_risk_set_cox(
    gather: Callable[[RiskSetRequest], Sequence[RiskSetSums]],
    event_times: FloatArray,
    n_covariates: int,
    ties: Ties = "efron",
    tol: float = 1e-12,
    max_iter: int = 50,
) -> RiskSetCoxFit:
    """Newton-Raphson on the pooled partial likelihood; ``gather`` runs one round at the sites.

    Converged when the next Newton step is below ``tol * (1 + |beta_j|)`` in every
    coefficient (Newton converges quadratically, so that step is near rounding level and
    the estimate exact); the reported estimate, SEs (inverse observed information) and
    loglik are all at the same, last requested ``beta``. Under monotone likelihood the
    steps stay near 1 while ``beta`` drifts, so the fit ends in :class:`ConvergenceError`.
    A step that lowers the loglik (or overflows) is halved, as in R's coxph.
    """
    if len(event_times) == 0:
        raise DataError(
            "no site has an event, so the Cox model has nothing to fit. "
            "Fix: check the cohort's outcome definition."
        )
    beta, centre = np.zeros(n_covariates), np.zeros(n_covariates)
    last: tuple[FloatArray, FloatArray, float] | None = None  # last accepted beta, step, loglik
    for iteration in range(1, max_iter + 1):
        replies = gather(RiskSetRequest(beta, centre, np.asarray(event_times, dtype=np.float64)))
        if not replies:
            raise DataError("no site answered the risk-set round. Fix: check the sites' replies.")
        total = reduce(lambda s, t: s + t, replies)
        derivatives = risk_set_cox_derivatives(total, ties)
        if iteration == 1:
            centre = total.risk_x[0] / total.risk[0]
        if last is not None and not (derivatives.loglik >= last[2] - 1e-12 * (1.0 + abs(last[2]))):
            halved = last[1] / 2.0
            last = (last[0], halved, last[2])
            beta = last[0] + halved
            continue
        try:
            update = newton_step(beta, derivatives)
        except ConvergenceError:
            reason = "the information matrix is singular or the step is not finite"
            raise ConvergenceError(_failure(ties, iteration, beta, reason)) from None
        covariance = _covariance(derivatives)
        if covariance is not None and np.all(np.abs(update.step) <= tol * (1.0 + np.abs(beta))):
            se = np.sqrt(np.diag(covariance))
            return RiskSetCoxFit(beta, se, covariance, derivatives.loglik, iteration, ties)
        last = (beta, update.step, derivatives.loglik)
        beta = update.beta
    raise ConvergenceError(_failure(ties, max_iter, beta, "the steps did not settle"))


def _failure(ties: Ties, rounds: int, beta: FloatArray, reason: str) -> str:
    return (
        f"the pooled Cox fit ({ties} ties) failed after {rounds} rounds ({reason}) at "
        f"coefficients {np.round(beta, 6).tolist()}. Large or growing coefficients mean a "
        "covariate (nearly) separates events from survivors (monotone likelihood); a "
        "singular information matrix also means a constant or collinear covariate. Fix: "
        "drop or merge that covariate, or raise max_iter if the coefficients were still "
        "settling."
    )
