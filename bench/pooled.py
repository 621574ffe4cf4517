"""The reference protocol's analyses on all sites' rows pooled in one process.

What a pooled study would run if the hospitals could pool their analysis rows: pandas for
the data, statsmodels and lifelines for the fits, and numpy only where neither library
fits the model fedrwe reports. Used by bench/paper_scale.py to time the pooled analysis
against the federated one and to measure the largest relative difference of every
estimate.

    crude        statsmodels PHReg, Breslow ties, strata = site; lifelines KM per arm
    propensity   statsmodels Logit (Newton) on the protocol's design columns
    matched      1:1 greedy nearest neighbour on the logit within each site, caliper
                 ``matching.caliper`` x the pooled SD of the logit, treated in descending PS
                 order (ties by person id), the closest control (ties by person id),
                 without replacement, read literally with numpy; then PHReg stratified by
                 matched pair (Breslow) and lifelines KM per arm
    iptw_ate, iptw_att, overlap
                 weights from the pooled PS by their textbook definitions; a weighted Cox
                 model stratified by site with Breslow ties and robust (sandwich)
                 variance, written out below in numpy (lifelines fits weighted Cox models
                 with Efron ties only, and the simulated times are whole days, so ties are
                 common; statsmodels' PHReg takes no weights); lifelines weighted KM per arm

The weighted Cox code here shares nothing with fedrwe's own kernels (shared/stats); on
tie-free data it equals lifelines' ``CoxPHFitter(robust=True)`` (tests/test_bench.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
from lifelines import KaplanMeierFitter
from scipy.special import expit
from statsmodels.duration.hazard_regression import PHReg

WEIGHTED = ("iptw_ate", "iptw_att", "overlap")
Z_95 = 1.959963984540054
COUNTS = ("n_exposed", "n_comparator", "events_exposed", "events_comparator")
ESTIMATES = ("log_hr", "se_log_hr", "hr", "ci_low", "ci_high", "risk_exposed", "risk_comparator")


def weighted_breslow_cox(time_: np.ndarray, event: np.ndarray, x: np.ndarray, weight: np.ndarray,
                         strata: np.ndarray, tol: float = 1e-13, max_iter: int = 50) -> tuple[float, float]:
    """log HR and robust SE of a one-covariate Cox model: weighted, stratified, Breslow ties.

    Newton-Raphson on the weighted Breslow partial likelihood; the robust variance is
    ``I^-1 (sum_i (w_i r_i)^2) I^-1`` with r_i the score residual of subject i (Lin and
    Wei 1989), summed over strata.
    """
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    beta = 0.0
    for _ in range(max_iter):
        score, info = 0.0, 0.0
        for idx in groups:
            u, i, _ = _stratum_terms(time_[idx], event[idx], x[idx], weight[idx], beta, residuals=False)
            score, info = score + u, info + i
        step = score / info
        beta += step
        if abs(step) < tol:
            break
    info, meat = 0.0, 0.0
    for idx in groups:
        _, i, r = _stratum_terms(time_[idx], event[idx], x[idx], weight[idx], beta, residuals=True)
        info += i
        meat += float(np.sum((weight[idx] * r) ** 2))
    return beta, math.sqrt(meat) / info


def _stratum_terms(t: np.ndarray, d: np.ndarray, x: np.ndarray, w: np.ndarray, beta: float,
                   residuals: bool) -> tuple[float, float, np.ndarray]:
    """Score, information and (optionally) score residuals of one stratum at ``beta``."""
    order = np.argsort(-t, kind="stable")  # descending time: cumulative sums are risk-set sums
    t, d, x, w = t[order], d[order], x[order], w[order]
    risk = w * np.exp(beta * x)
    _times, first = np.unique(-t, return_index=True)  # distinct times, descending as -t ascending
    last = np.append(first[1:], len(t)) - 1  # last row of each distinct time
    s0 = np.cumsum(risk)[last]
    s1 = np.cumsum(risk * x)[last]
    s2 = np.cumsum(risk * x * x)[last]
    group = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(t))))
    dw = np.bincount(group, weights=w * d, minlength=len(first))  # weighted events per time
    dwx = np.bincount(group, weights=w * d * x, minlength=len(first))
    xbar = s1 / s0
    score = float(np.sum(dwx - dw * xbar))
    info = float(np.sum(dw * (s2 / s0 - xbar * xbar)))
    if not residuals:
        return score, info, np.empty(0)
    # cumulative over times <= t_i: times are descending, so sum from the end up to the row's time
    hazard = dw / s0
    cum_h = np.cumsum(hazard[::-1])[::-1]
    cum_hx = np.cumsum((hazard * xbar)[::-1])[::-1]
    r_sorted = d * (x - xbar[group]) - np.exp(beta * x) * (x * cum_h[group] - cum_hx[group])
    r = np.empty_like(r_sorted)
    r[order] = r_sorted
    return score, info, r


def greedy_pairs(site: pd.DataFrame, caliper: float) -> list[tuple[int, int]]:
    """1:1 greedy matching within one site, the rules read literally (O(treated x controls))."""
    treated = site[site.treatment == 1].sort_values(["logit", "person_id"], ascending=[False, True])
    controls = site[site.treatment == 0].sort_values("person_id")
    c_logit = controls.logit.to_numpy(float)
    c_id = controls.person_id.to_numpy()
    free = np.ones(len(controls), dtype=bool)
    pairs = []
    for tid, logit in zip(treated.person_id.to_numpy(), treated.logit.to_numpy(float), strict=True):
        distance = np.where(free, np.abs(c_logit - logit), np.inf)
        best = int(np.argmin(distance))  # the first minimum: the smallest person id (sorted)
        if distance[best] <= caliper:
            free[best] = False
            pairs.append((int(tid), int(c_id[best])))
    return pairs


def km_risk(frame: pd.DataFrame, horizon: int, weights: np.ndarray | None = None) -> float:
    """1 - S(horizon) of lifelines' Kaplan-Meier estimate."""
    km = KaplanMeierFitter().fit(frame.time, frame.event, weights=weights)
    return float(1.0 - km.survival_function_at_times([horizon]).to_numpy()[0])


def _estimate(log_hr: float, se: float, frame: pd.DataFrame, horizon: int,
              weights: np.ndarray | None) -> dict[str, Any]:
    treated = frame.treatment.to_numpy() == 1
    out: dict[str, Any] = {
        "n_exposed": int(treated.sum()), "n_comparator": int((~treated).sum()),
        "events_exposed": int(frame.event[treated].sum()), "events_comparator": int(frame.event[~treated].sum()),
        "log_hr": log_hr, "se_log_hr": se, "hr": math.exp(log_hr),
        "ci_low": math.exp(log_hr - Z_95 * se), "ci_high": math.exp(log_hr + Z_95 * se),
    }
    for arm, mask in (("exposed", treated), ("comparator", ~treated)):
        out[f"risk_{arm}"] = km_risk(frame[mask], horizon, None if weights is None else weights[mask])
    return out


def pooled_analyses(pooled: pd.DataFrame, ps_terms: list[str], caliper_sd: float,
                    horizon: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Every analysis of the reference protocol on the pooled rows; and seconds per step.

    ``ps_terms``: the PS model's design columns after the intercept (results.json names them).
    """
    seconds: dict[str, float] = {}

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = fn()
        seconds[step] = round(time.perf_counter() - started, 4)
        return value

    pooled = pooled.sort_values(["site_id", "person_id"]).reset_index(drop=True)
    t = pooled.time.to_numpy(float)
    e = pooled.event.to_numpy(int)
    a = pooled.treatment.to_numpy(float)
    sites = pooled.site_id.to_numpy()
    out: dict[str, Any] = {}

    crude = timed("crude Cox (statsmodels)", lambda: PHReg(t, a[:, None], status=e, ties="breslow", strata=sites).fit())
    out["crude"] = timed("crude KM (lifelines)", lambda: _estimate(float(crude.params[0]), float(crude.bse[0]),
                                                                   pooled, horizon, None))
    design = np.column_stack([np.ones(len(pooled)), pooled[ps_terms].to_numpy(float)])
    ps = timed("propensity (statsmodels Logit)", lambda: sm.Logit(a, design).fit(
        disp=0, method="newton", tol=1e-14, maxiter=100))
    out["propensity"] = {"coefficients": ps.params.tolist(), "standard_errors": ps.bse.tolist()}
    logit = design @ ps.params
    caliper = caliper_sd * float(np.std(logit, ddof=1))
    out["propensity"]["caliper_logit"] = caliper
    with_logit = pooled.assign(logit=logit)
    pairs = timed("matching (numpy, literal rules)", lambda: [
        pair for _, site in with_logit.groupby("site_id", sort=True) for pair in greedy_pairs(site, caliper)])
    pair_of = {person: k for k, pair in enumerate(pairs) for person in pair}
    matched = pooled[pooled.person_id.isin(pair_of)]
    fit = timed("matched Cox (statsmodels)", lambda: PHReg(
        matched.time.to_numpy(float), matched[["treatment"]].to_numpy(float), status=matched.event.to_numpy(int),
        strata=matched.person_id.map(pair_of).to_numpy(), ties="breslow").fit())
    out["matched"] = timed("matched KM (lifelines)", lambda: _estimate(
        float(fit.params[0]), float(fit.bse[0]), matched, horizon, None))
    score = expit(logit)
    weights = {
        "iptw_ate": a / score + (1 - a) / (1 - score),
        "iptw_att": a + (1 - a) * score / (1 - score),
        "overlap": a * (1 - score) + (1 - a) * score,
    }
    for name in WEIGHTED:
        w = weights[name]
        log_hr, se = timed(f"{name} Cox (numpy)", lambda w=w: weighted_breslow_cox(t, e, a, w, sites))
        out[name] = timed(f"{name} KM (lifelines)", lambda w=w, log_hr=log_hr, se=se: _estimate(
            log_hr, se, pooled, horizon, w))
    return out, seconds


def relative_differences(federated: dict[str, Any], pooled: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per compared number: analysis, quantity, federated, pooled, |diff| / |pooled|.

    Counts are compared exactly (their relative difference is 0 only when equal).
    """
    rows: list[dict[str, Any]] = []

    def add(analysis: str, quantity: str, fed: Any, ref: Any) -> None:
        if fed is None:
            rows.append({"analysis": analysis, "quantity": quantity, "federated": None, "pooled": ref,
                         "rel_diff": None})
            return
        diff = abs(float(fed) - float(ref))
        rows.append({"analysis": analysis, "quantity": quantity, "federated": fed, "pooled": ref,
                     "rel_diff": diff / abs(float(ref)) if ref else diff})

    analyses = federated["analyses"]
    for name in ("crude", "matched", *WEIGHTED):
        fed = analyses.get(name, {})
        for key in (*COUNTS, *ESTIMATES):
            add(name, key, fed.get(key), pooled[name][key])
    prop = federated["propensity"]
    for term, fed_value, ref in zip(prop["coefficients"], prop["coefficients"].values(),
                                    pooled["propensity"]["coefficients"], strict=True):
        add("propensity", f"coef {term}", fed_value, ref)
    for term, fed_value, ref in zip(prop["standard_errors"], prop["standard_errors"].values(),
                                    pooled["propensity"]["standard_errors"], strict=True):
        add("propensity", f"se {term}", fed_value, ref)
    add("propensity", "caliper_logit", prop.get("caliper_logit"), pooled["propensity"]["caliper_logit"])
    return rows
