"""Bad data for the estimators: each case ends in a named error or a documented fallback, never NaN.

The study runs through the coordinator's real plan and the sites' real partial
computations and disclosure guard (tests/rows_site.py), on rows shaped for each case.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from coordinator.plan import StudyPlan
from coordinator.results import build_results
from shared.errors import ConvergenceError
from site_agent.settings import DisclosurePolicy
from tests.pooled_reference import RELATIVE_TOLERANCE
from tests.rows_site import RowsSite, rows_from_frame
from tests.test_adjusted_estimators import COVARIATES, make_rows, protocol, split

STUDY = protocol()
POLICY = DisclosurePolicy(min_cell_count=1)


def run(frame: pd.DataFrame, policy: DisclosurePolicy = POLICY) -> StudyPlan:
    sites = [
        RowsSite(site_id, rows_from_frame(rows, COVARIATES), STUDY, policy)
        for site_id, rows in frame.groupby("site_id")
    ]
    plan = StudyPlan(STUDY)
    while (request := plan.next_request()) is not None:
        plan.absorb({site.site_id: site.reply(request) for site in sites})
    return plan


def base(seed: int = 21) -> pd.DataFrame:
    return split(make_rows(900, whole_days=True, seed=seed), 3)


def test_no_events_in_an_arm_gives_named_errors_and_a_finite_results_json() -> None:
    frame = base()
    frame.loc[frame.treatment == 1, "event"] = 0
    plan = run(frame)
    results = build_results(plan, [])
    json.dumps(results, allow_nan=False)
    assert "exposed arm has no events" in results["analyses"]["crude"]["error"]
    for name in ("matched", "iptw_ate", "iptw_att", "overlap"):
        assert "0 exposed" in results["analyses"][name]["error"] or "no event" in results["analyses"][name]["error"]
    assert len(plan.propensity()["coefficients"]) == 4  # the propensity model still runs


def test_an_empty_arm_at_one_site_still_equals_the_pooled_propensity_fit() -> None:
    frame = base()
    frame = frame[~((frame.site_id == "site_1") & (frame.treatment == 1))]
    plan = run(frame)
    design = sm.add_constant(frame[COVARIATES].to_numpy(float))
    fit = sm.Logit(frame.treatment.to_numpy(float), design).fit(disp=0, method="newton", tol=1e-14)
    np.testing.assert_allclose(list(plan.propensity()["coefficients"].values()), fit.params, rtol=RELATIVE_TOLERANCE)
    json.dumps(build_results(plan, []), allow_nan=False)
    assert "site_1" in {entry["site_id"] for entry in build_results(plan, [])["meta"]["matched"]["excluded"]}


def test_a_covariate_constant_at_one_site_is_fine() -> None:
    frame = base()
    frame.loc[frame.site_id == "site_0", "depression"] = 0.0
    plan = run(frame)
    design = sm.add_constant(frame[COVARIATES].to_numpy(float))
    fit = sm.Logit(frame.treatment.to_numpy(float), design).fit(disp=0, method="newton", tol=1e-14)
    np.testing.assert_allclose(list(plan.propensity()["standard_errors"].values()), fit.bse, rtol=RELATIVE_TOLERANCE)


def test_a_covariate_constant_everywhere_is_named() -> None:
    frame = base().assign(depression=1.0)
    with pytest.raises(ConvergenceError, match=r"\['depression'\] take one value in every site"):
        run(frame)


def test_perfect_separation_is_refused_by_the_sites_and_the_crude_analysis_survives() -> None:
    frame = base()
    frame["sex_female"] = frame.treatment  # sex separates the arms
    plan = run(frame)
    results = build_results(plan, [])
    json.dumps(results, allow_nan=False)
    assert "coefficients beyond the site's bound" in results["propensity"]["error"]
    assert "set an L2 penalty" in results["propensity"]["error"]  # the fix
    assert results["analyses"]["crude"]["hr"] > 0
    for name in ("matched", "iptw_ate", "iptw_att", "overlap"):
        assert "the propensity model has no estimate" in results["analyses"][name]["error"]


def exchanges(frame: pd.DataFrame, policies: dict[str, DisclosurePolicy]) -> tuple[StudyPlan, int]:
    sites = [
        RowsSite(site_id, rows_from_frame(rows, COVARIATES), STUDY, policies[site_id])
        for site_id, rows in frame.groupby("site_id")
    ]
    plan, count = StudyPlan(STUDY), 0
    while (request := plan.next_request()) is not None:
        plan.absorb({site.site_id: site.reply(request) for site in sites})
        count += 1
    return plan, count


def test_without_event_tables_the_cox_fits_equal_the_central_ones_in_at_most_ten_exchanges() -> None:
    """One site's policy keeps event tables home: Cox fits by rounds of derivatives, same numbers."""
    frame = base(seed=23)
    with_tables, few = exchanges(frame, dict.fromkeys(frame.site_id.unique(), POLICY))
    keeping = {**dict.fromkeys(frame.site_id.unique(), POLICY), "site_1": DisclosurePolicy(min_cell_count=1, event_tables=False)}
    without, many = exchanges(frame, keeping)
    assert few == 5
    assert many <= 10
    central, rounds = with_tables.analyses(), without.analyses()
    for name in ("crude", "matched", "iptw_ate", "iptw_att", "overlap"):
        assert rounds[name]["log_hr"] == pytest.approx(central[name]["log_hr"], rel=RELATIVE_TOLERANCE), name
        assert rounds[name]["se_log_hr"] == pytest.approx(central[name]["se_log_hr"], rel=RELATIVE_TOLERANCE), name
        assert rounds[name]["n_exposed"] == central[name]["n_exposed"]
        assert rounds[name]["km"] is None
        assert rounds[name]["ph_check"]["p_value"] == pytest.approx(central[name]["ph_check"]["p_value"], rel=1e-7)
        assert "event tables" in rounds[name]["survival_note"]
    results = build_results(without, [])
    json.dumps(results, allow_nan=False)
    for name in ("iptw_ate", "matched"):  # per-site estimates for the meta-analysis come from the sites' own fits
        expected = {s["site_id"]: s["log_hr"] for s in build_results(with_tables, [])["meta"][name]["sites"]}
        for site in results["meta"][name]["sites"]:
            assert site["log_hr"] == pytest.approx(expected[site["site_id"]], rel=1e-9)
