"""Federated equals pooled for the propensity-score analyses (matching, IPTW, overlap weights).

One synthetic dataset is split over k = 1, 2, 3 and 7 sites (one of them tiny); each site
runs the adjusted round's partial (site_agent/analyses/adjusted.py) on its rows, the
coordinator combines them (coordinator/adjusted.py), and every number is compared with
the same analysis on the pooled rows by an independent library:

* weighted Cox (IPTW ATE/ATT, overlap), stratified by site, robust variance: lifelines
  ``CoxPHFitter(robust=True)`` with ``weights_col`` and ``strata`` (continuous times, so
  lifelines' Efron ties equal fedrwe's Breslow);
* matched Cox, stratified by matched set: statsmodels ``PHReg(ties="breslow")`` on the
  pairs of a literal O(n*m) reading of the matching rules (tests/test_matching.py), on
  whole-day times (ties);
* Kaplan-Meier curves and CIs, risks: lifelines ``KaplanMeierFitter`` (with weights);
  log-rank: lifelines ``logrank_test``; c-statistic: scikit-learn ``roc_auc_score``;
* balance: pandas weighted means and variances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from statsmodels.duration.hazard_regression import PHReg

from coordinator import ph_check
from coordinator.adjusted import combine
from shared.protocol.model import StudyProtocol, load_protocol
from shared.stats.stratified_cox import WeightedTable, weighted_event_table, window_meat
from site_agent.analyses.adjusted import adjusted
from site_agent.analyses.rows import AnalysisRows
from site_agent.disclosure.guard import guarded
from site_agent.settings import DisclosurePolicy
from tests.pooled_reference import RELATIVE_TOLERANCE
from tests.test_matching import brute_force, literal_sets

BASE = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")
COVARIATES = ["age", "sex_female", "depression"]
SITE_SIZES = {1: [900], 2: [880, 20], 3: [500, 385, 15], 7: [260, 200, 150, 120, 90, 60, 20]}
WEIGHTED = ("iptw_ate", "iptw_att", "overlap")


def protocol(**update: Any) -> StudyProtocol:
    data = BASE.model_dump(mode="json")
    data["covariates"] = [
        {"name": "age", "kind": "age"}, {"name": "sex", "kind": "sex"},
        {"name": "depression", "kind": "condition", "codes": {"vocabulary": "ICD10CM", "include": ["F32.*"]}},
    ]
    data.update(update)
    return StudyProtocol.model_validate(data)


def make_rows(n: int, whole_days: bool, seed: int) -> pd.DataFrame:
    """Confounded treatment, exponential event times with censoring, as an analysis dataset."""
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 10, n).round(1)
    sex = rng.integers(0, 2, n).astype(float)
    depression = (rng.random(n) < 0.3).astype(float)
    score = expit(-1.2 + 0.04 * (age - 40) + 0.5 * sex + 0.9 * depression)
    treatment = (rng.random(n) < score).astype(float)
    hazard = 0.002 * np.exp(0.6 * treatment + 0.02 * (age - 40) + 0.5 * depression)
    event_time = rng.exponential(1.0 / hazard)
    censor = rng.uniform(30, 500, n)
    time = np.minimum.reduce([event_time, censor, np.full(n, 365.0)])
    event = (event_time <= np.minimum(censor, 365.0)).astype(int)
    if whole_days:
        time = np.ceil(time)
    return pd.DataFrame({
        "person_id": rng.permutation(10 * n)[:n] + 1, "treatment": treatment, "time": time, "event": event,
        "age": age, "sex_female": sex, "depression": depression,
    })


def split(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    sizes = SITE_SIZES[k]
    frame = frame.iloc[: sum(sizes)].copy()
    frame["site_id"] = np.repeat([f"site_{i}" for i in range(k)], sizes)
    return frame


def rows_of(site: pd.DataFrame) -> AnalysisRows:
    site = site.sort_values("person_id")
    design = np.column_stack([np.ones(len(site)), site[COVARIATES].to_numpy(float)])
    return AnalysisRows(
        site.person_id.to_numpy(np.int64), site.treatment.to_numpy(float), site.time.to_numpy(),
        site.event.to_numpy(np.int64), design,
    )


def pooled_fit(frame: pd.DataFrame) -> tuple[np.ndarray, float, float]:
    """The propensity model (statsmodels), the caliper (0.1 SD of the logit) and P(exposed)."""
    import statsmodels.api as sm

    design = np.column_stack([np.ones(len(frame)), frame[COVARIATES].to_numpy(float)])
    beta = sm.Logit(frame.treatment.to_numpy(float), design).fit(disp=0, method="newton", tol=1e-14).params
    return beta, 0.1 * float(np.std(design @ beta, ddof=1)), float(frame.treatment.mean())


def federated(frame: pd.DataFrame, study: StudyProtocol, min_cell_count: int = 1) -> tuple[dict[str, Any], np.ndarray]:
    beta, caliper, share = pooled_fit(frame)
    params = {"beta": beta.tolist(), "caliper": caliper * study.matching.caliper / 0.1, "exposed_share": share}
    site_ids = sorted(frame.site_id.unique())
    partials = []
    for site_id in site_ids:
        release = adjusted(rows_of(frame[frame.site_id == site_id]), study, params, 1e6, min_cell_count)
        policy = DisclosurePolicy(min_cell_count=min_cell_count)
        values = guarded(lambda release=release: {"adjusted": release}, policy, site_id).values["adjusted"]
        partials.append(json.loads(json.dumps(values, allow_nan=False)))  # over the wire
    return combine(study, partials, site_ids), beta


def weights(frame: pd.DataFrame, beta: np.ndarray, name: str) -> np.ndarray:
    """The weights read from their textbook definitions on the pooled rows."""
    e = expit(np.column_stack([np.ones(len(frame)), frame[COVARIATES].to_numpy(float)]) @ beta)
    t = frame.treatment.to_numpy()
    return {
        "iptw_ate": t / e + (1 - t) / (1 - e),
        "iptw_att": t + (1 - t) * e / (1 - e),
        "overlap": t * (1 - e) + (1 - t) * e,
    }[name]


def loglog_band(km: KaplanMeierFitter, times: list[float]) -> pd.DataFrame:
    """The log(-log) Greenwood band from lifelines' weighted event table.

    lifelines' own band truncates weighted numbers at risk to integers in the Greenwood
    sum, so for weighted curves the band is recomputed here from the textbook formula.
    """
    table = km.event_table
    n, d = table["at_risk"].to_numpy(float), table["observed"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(np.where(d > 0, d / (n * (n - d)), 0.0))
    survival = km.survival_function_.iloc[:, 0].to_numpy()
    half = 1.959963984540054 * np.sqrt(greenwood) / np.abs(np.log(survival))
    low, high = survival ** np.exp(half), survival ** np.exp(-half)
    return pd.DataFrame({"low": low, "high": high}, index=table.index).loc[times]


@pytest.fixture(scope="module", params=[1, 2, 3, 7])
def continuous(request: pytest.FixtureRequest) -> dict[str, Any]:
    frame = split(make_rows(900, whole_days=False, seed=3), request.param)
    result, beta = federated(frame, protocol())
    return {"frame": frame, "result": result, "beta": beta}


@pytest.mark.parametrize("name", WEIGHTED)
def test_weighted_cox_with_robust_variance_equals_lifelines(continuous: dict[str, Any], name: str) -> None:
    frame = continuous["frame"].assign(w=weights(continuous["frame"], continuous["beta"], name))
    fit = CoxPHFitter().fit(
        frame[["time", "event", "treatment", "w", "site_id"]], "time", "event",
        weights_col="w", strata=["site_id"], robust=True, fit_options={"precision": 1e-14, "r_precision": 0.0},
    )
    analysis = continuous["result"]["analyses"][name]
    assert analysis["log_hr"] == pytest.approx(fit.params_["treatment"], rel=RELATIVE_TOLERANCE)
    assert analysis["se_log_hr"] == pytest.approx(fit.standard_errors_["treatment"], rel=RELATIVE_TOLERANCE)
    assert analysis["site_stratified"] is True


@pytest.mark.parametrize("name", ["crude", *WEIGHTED])
def test_pooled_baseline_cox_equals_lifelines_without_strata(continuous: dict[str, Any], name: str) -> None:
    frame = continuous["frame"]
    w = np.ones(len(frame)) if name == "crude" else weights(frame, continuous["beta"], name)
    fit = CoxPHFitter().fit(
        frame.assign(w=w)[["time", "event", "treatment", "w"]], "time", "event", weights_col="w",
        robust=name != "crude", fit_options={"precision": 1e-14, "r_precision": 0.0},
    )
    pooled = continuous["result"]["analyses"][name]["pooled_baseline"]
    assert pooled["log_hr"] == pytest.approx(fit.params_["treatment"], rel=RELATIVE_TOLERANCE)
    assert pooled["se_log_hr"] == pytest.approx(fit.standard_errors_["treatment"], rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("name", ["crude", *WEIGHTED])
def test_km_risks_and_counts_equal_lifelines(continuous: dict[str, Any], name: str) -> None:
    frame = continuous["frame"]
    w = np.ones(len(frame)) if name == "crude" else weights(frame, continuous["beta"], name)
    analysis = continuous["result"]["analyses"][name]
    for arm, label in ((1, "exposed"), (0, "comparator")):
        rows = frame.treatment.to_numpy() == arm
        assert analysis[f"n_{label}"] == rows.sum()
        assert analysis[f"events_{label}"] == frame.event[rows].sum()
        km = KaplanMeierFitter().fit(frame.time[rows], frame.event[rows], weights=w[rows])
        curve = analysis["km"][label]
        expected = km.survival_function_at_times(curve["time"]).to_numpy()
        np.testing.assert_allclose(curve["survival"], expected, rtol=RELATIVE_TOLERANCE)
        band = km.confidence_interval_.loc[curve["time"]] if name == "crude" else loglog_band(km, curve["time"])
        np.testing.assert_allclose(curve["ci_low"], band.iloc[:, 0], rtol=RELATIVE_TOLERANCE)
        np.testing.assert_allclose(curve["ci_high"], band.iloc[:, 1], rtol=RELATIVE_TOLERANCE)
        risk = 1.0 - float(km.survival_function_at_times([365.0]).iloc[0])
        assert analysis[f"risk_{label}"] == pytest.approx(risk, rel=RELATIVE_TOLERANCE)
    assert analysis["risk_difference"] == pytest.approx(analysis["risk_exposed"] - analysis["risk_comparator"])
    assert analysis["risk_ratio"] == pytest.approx(analysis["risk_exposed"] / analysis["risk_comparator"])


def test_crude_logrank_equals_lifelines(continuous: dict[str, Any]) -> None:
    frame = continuous["frame"]
    a, b = frame[frame.treatment == 1], frame[frame.treatment == 0]
    expected = logrank_test(a.time, b.time, a.event, b.event)
    analysis = continuous["result"]["analyses"]["crude"]
    assert analysis["logrank_statistic"] == pytest.approx(expected.test_statistic, rel=RELATIVE_TOLERANCE)
    assert analysis["logrank_p"] == pytest.approx(expected.p_value, rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("name", ["crude", *WEIGHTED])
def test_balance_equals_pandas_weighted_moments(continuous: dict[str, Any], name: str) -> None:
    frame = continuous["frame"]
    w = np.ones(len(frame)) if name == "crude" else weights(frame, continuous["beta"], name)
    label = "before" if name == "crude" else name
    for column in COVARIATES:
        moments = []
        for arm in (1, 0):
            rows = frame.treatment.to_numpy() == arm
            x, wa = frame[column].to_numpy()[rows], w[rows]
            mean = np.average(x, weights=wa)
            moments.append((mean, np.average((x - mean) ** 2, weights=wa)))
        smd = (moments[0][0] - moments[1][0]) / np.sqrt((moments[0][1] + moments[1][1]) / 2)
        entry = continuous["result"]["balance"]["covariates"][column][label]
        assert entry["smd"] == pytest.approx(smd, rel=1e-9, abs=1e-12)
        assert entry["mean_exposed"] == pytest.approx(moments[0][0], rel=RELATIVE_TOLERANCE)


def test_overlap_weights_balance_the_model_covariates_exactly(continuous: dict[str, Any]) -> None:
    """A known property of overlap weights with a logistic PS (Li, Morgan & Zaslavsky 2018)."""
    assert continuous["result"]["balance"]["max_abs_smd"]["overlap"] < 1e-9


def test_c_statistic_within_sites_equals_scikit_learn(continuous: dict[str, Any]) -> None:
    frame = continuous["frame"]
    design = np.column_stack([np.ones(len(frame)), frame[COVARIATES].to_numpy(float)])
    frame = frame.assign(score=expit(design @ continuous["beta"]))
    weighted, pairs = 0.0, 0.0
    for _, site in frame.groupby("site_id"):
        n1, n0 = int(site.treatment.sum()), int((1 - site.treatment).sum())
        if n1 and n0:
            weighted += roc_auc_score(site.treatment, site.score) * n1 * n0
            pairs += n1 * n0
    histogram = continuous["result"]["histogram"]
    assert histogram["c_statistic"] == pytest.approx(weighted / pairs, rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("name", ["crude", *WEIGHTED])
def test_ph_window_hrs_equal_lifelines_with_events_outside_the_window_censored(continuous: dict[str, Any], name: str) -> None:
    """A window's HR uses only that window's event days, so it is the fit with other events censored."""
    frame = continuous["frame"]
    w = np.ones(len(frame)) if name == "crude" else weights(frame, continuous["beta"], name)
    check = continuous["result"]["analyses"][name]["ph_check"]
    for window in check["windows"]:
        end = np.inf if window["end_day"] is None else window["end_day"]
        inside = (frame.time >= window["start_day"]) & (frame.time < end)
        data = frame.assign(event=frame.event * inside, w=w)[["time", "event", "treatment", "w", "site_id"]]
        fit = CoxPHFitter().fit(data, "time", "event", weights_col="w", strata=["site_id"], robust=name != "crude",
                                fit_options={"precision": 1e-14, "r_precision": 0.0})
        assert window["log_hr"] == pytest.approx(fit.params_["treatment"], rel=1e-7)
        assert window["se_log_hr"] == pytest.approx(fit.standard_errors_["treatment"], rel=1e-7)
    assert 0.0 <= check["p_value"] <= 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_matched_cox_equals_statsmodels_on_the_literal_matching(k: int) -> None:
    frame = split(make_rows(900, whole_days=True, seed=5), k)
    result, beta = federated(frame, protocol())
    _, caliper, _ = pooled_fit(frame)
    design = np.column_stack([np.ones(len(frame)), frame[COVARIATES].to_numpy(float)])
    frame = frame.assign(logit=design @ beta)
    pairs = []
    for _, site in frame.groupby("site_id"):
        t, c = site[site.treatment == 1], site[site.treatment == 0]
        pairs += brute_force(t.person_id.to_numpy(), t.logit.to_numpy(), c.person_id.to_numpy(), c.logit.to_numpy(), caliper)
    pair_of = {p: i for i, pair in enumerate(pairs) for p in pair}
    matched = frame[frame.person_id.isin(pair_of)].assign(pair=lambda d: d.person_id.map(pair_of))
    fit = PHReg(matched.time.to_numpy(float), matched[["treatment"]].to_numpy(float), status=matched.event.to_numpy(int),
                strata=matched.pair.to_numpy(), ties="breslow").fit()
    analysis = result["analyses"]["matched"]
    assert analysis["n_exposed"] == analysis["n_comparator"] == len(pairs)
    assert analysis["events_exposed"] == matched.event[matched.treatment == 1].sum()
    assert analysis["log_hr"] == pytest.approx(fit.params[0], rel=RELATIVE_TOLERANCE)
    assert analysis["se_log_hr"] == pytest.approx(fit.bse[0], rel=RELATIVE_TOLERANCE)
    assert analysis["matched_set_stratified"] is True


def test_one_to_two_matched_cox_equals_statsmodels_stratified_by_matched_set() -> None:
    frame = split(make_rows(900, whole_days=True, seed=6), 3)
    study = protocol(matching={"ratio": 2, "caliper": 0.2})
    result, beta = federated(frame, study)
    design = np.column_stack([np.ones(len(frame)), frame[COVARIATES].to_numpy(float)])
    frame = frame.assign(logit=design @ beta)
    caliper = 0.2 * float(np.std(frame.logit, ddof=1))
    set_of: dict[int, int] = {}
    for _, site in frame.groupby("site_id"):
        t, c = site[site.treatment == 1], site[site.treatment == 0]
        sets = literal_sets(t.person_id.to_numpy(), t.logit.to_numpy(), c.person_id.to_numpy(), c.logit.to_numpy(), caliper, 2)
        set_of.update({member: treated for treated, controls in sets.items() for member in (treated, *controls)})
    matched = frame[frame.person_id.isin(set_of)]
    fit = PHReg(matched.time.to_numpy(float), matched[["treatment"]].to_numpy(float), status=matched.event.to_numpy(int),
                strata=matched.person_id.map(set_of).to_numpy(), ties="breslow").fit()
    analysis = result["analyses"]["matched"]
    assert analysis["n_comparator"] == (matched.treatment == 0).sum() > analysis["n_exposed"]
    assert analysis["log_hr"] == pytest.approx(fit.params[0], rel=RELATIVE_TOLERANCE)
    assert analysis["se_log_hr"] == pytest.approx(fit.bse[0], rel=RELATIVE_TOLERANCE)


def test_an_analysis_with_small_counts_at_a_site_is_withheld_alone() -> None:
    frame = split(make_rows(900, whole_days=True, seed=5), 3)  # site_2 has 15 rows
    result, _ = federated(frame, protocol(), min_cell_count=10)
    for name in ("crude", "matched", "iptw_ate", "iptw_att", "overlap"):
        error = result["analyses"][name]["error"]
        assert "withheld by site(s) ['site_2']" in error
        assert "below the site's minimum cell count 10" in error
        assert "site_2" not in {s["site_id"] for s in result["meta"][name]["sites"]}
    json.dumps(result, allow_nan=False)


def test_results_never_hold_nan_even_when_a_caliper_matches_nobody() -> None:
    frame = split(make_rows(900, whole_days=True, seed=8), 3)
    frame["age"] += np.random.default_rng(0).normal(0, 1e-3, len(frame))  # no two logits alike
    study = protocol(matching={"ratio": 1, "caliper": 1e-9})
    result, _ = federated(frame, study)
    assert "caliper matches nobody" in result["analyses"]["matched"]["error"]
    assert result["analyses"]["matched"]["n_exposed"] == 0
    json.dumps(result, allow_nan=False)


def test_ph_score_test_equals_statsmodels_on_episode_split_rows(continuous: dict[str, Any]) -> None:
    """The window model as a time-varying covariate on episode-split rows (statsmodels PHReg with
    entry times): its score and information at the common estimate give the same model-based test."""
    frame, cuts = continuous["frame"], protocol().cut_days()
    crude = continuous["result"]["analyses"]["crude"]
    episodes = []
    for k, (start, end) in enumerate(ph_check.windows_of(cuts)):
        rows = frame[frame.time > start]
        episodes.append(pd.DataFrame({
            "entry": start, "exit": np.minimum(rows.time, end), "status": rows.event * (rows.time < end),
            "site_id": rows.site_id, **{f"x{j}": rows.treatment * (j == k) for j in range(len(cuts) + 1)},
        }))
    split_rows = pd.concat(episodes)
    model = PHReg(split_rows.exit.to_numpy(), split_rows[[f"x{j}" for j in range(len(cuts) + 1)]].to_numpy(float),
                  status=split_rows.status.to_numpy(), entry=split_rows.entry.to_numpy(),
                  strata=split_rows.site_id.to_numpy(), ties="breslow")
    at = np.full(len(cuts) + 1, crude["log_hr"])
    score, information = model.score(at), -model.hessian(at)
    assert crude["ph_check"]["statistic"] == pytest.approx(score @ np.linalg.solve(information, score), rel=1e-7)


def textbook_window_meat(frame: pd.DataFrame, w: np.ndarray, beta: float, cuts: list[int]) -> np.ndarray:
    """sum_i w_i^2 U_i U_i' with U_ik the row's Lin-Wei score residual for window k, row by row."""
    meat = np.zeros((len(cuts) + 1, len(cuts) + 1))
    for _, site in frame.assign(w=w).groupby("site_id"):
        t, d, a, ws = site.time.to_numpy(), site.event.to_numpy(), site.treatment.to_numpy(), site.w.to_numpy()
        days = np.unique(t[d == 1])
        s0 = np.array([np.sum((ws * np.exp(beta * a))[t >= u]) for u in days])
        p = np.array([np.sum((ws * a * np.exp(beta * a))[t >= u]) for u in days]) / s0
        deaths = np.array([np.sum(ws[(t == u) & (d == 1)]) for u in days])
        residuals = np.zeros((len(t), len(cuts) + 1))
        for k, (start, end) in enumerate(ph_check.windows_of(cuts)):
            inside = (days >= start) & (days < end)
            for i in range(len(t)):
                compensator = np.sum((inside & (days <= t[i])) * np.exp(beta * a[i]) * (a[i] - p) * deaths / s0)
                jump = a[i] - p[np.searchsorted(days, t[i])] if d[i] and start <= t[i] < end else 0.0
                residuals[i, k] = jump - compensator
        meat += (residuals * ws[:, None] ** 2).T @ residuals
    return meat


def test_robust_ph_score_test_uses_the_textbook_residuals() -> None:
    """statsmodels' score residuals with entry times differ from the textbook residuals (by ~1%
    here), so the robust window meat is checked against a row-by-row reading of Lin & Wei."""
    frame = split(make_rows(900, whole_days=False, seed=3), 3)
    result, beta = federated(frame, protocol())
    cuts, log_hr = protocol().cut_days(), result["analyses"]["iptw_ate"]["log_hr"]
    frame = frame.assign(w=weights(frame, beta, "iptw_ate")).sort_values("person_id")
    expected = textbook_window_meat(frame, frame.w.to_numpy(), log_hr, cuts)
    parts = []
    for _, site in frame.groupby("site_id"):  # frame is in person-id order, as rows_of sorts
        rows = rows_of(site)
        released = weighted_event_table(rows.time, rows.treatment, rows.event, site.w.to_numpy()).to_json()
        parts.append(WeightedTable.from_json(json.loads(json.dumps(released))))
    meat = sum(window_meat(p.table, p.squares, log_hr, ph_check.windows_of(cuts)) for p in parts)
    np.testing.assert_allclose(meat, expected, rtol=1e-9)
