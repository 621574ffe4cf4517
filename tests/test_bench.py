"""The benchmarks' own logic: the pooled reference fits, the tables and the rendered document.

The benchmarks themselves never run in the test suite (``make bench``); these tests check
that what they compare against is right, quickly and without Spark or servers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from statsmodels.duration.hazard_regression import PHReg

from bench.common import format_table, markdown_table, table, write_result
from bench.pooled import greedy_pairs, relative_differences, weighted_breslow_cox
from bench.render_docs import BEGIN, END, render
from tests.test_matching import brute_force


def survival_rows(n: int, seed: int, whole_days: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = (rng.random(n) < 0.4).astype(float)
    t = np.minimum(rng.exponential(300 * np.exp(-0.5 * x)), 365.0)
    if whole_days:
        t = np.ceil(t)
    return pd.DataFrame({
        "time": t, "event": (t < 365).astype(int), "x": x, "w": rng.uniform(0.5, 3.0, n),
        "site": rng.integers(0, 3, n),
    })


def test_weighted_cox_equals_lifelines_robust_on_tie_free_times() -> None:
    rows = survival_rows(400, 1, whole_days=False)
    fit = CoxPHFitter().fit(rows, "time", "event", weights_col="w", strata=["site"], robust=True,
                            fit_options={"precision": 1e-14, "r_precision": 0.0})
    log_hr, se = weighted_breslow_cox(rows.time.to_numpy(), rows.event.to_numpy(), rows.x.to_numpy(),
                                      rows.w.to_numpy(), rows.site.to_numpy())
    assert log_hr == pytest.approx(fit.params_["x"], rel=1e-9)
    assert se == pytest.approx(fit.standard_errors_["x"], rel=1e-8)


def test_unweighted_cox_with_tied_days_equals_statsmodels_breslow() -> None:
    rows = survival_rows(600, 2, whole_days=True)
    assert rows.time.duplicated().any()
    fit = PHReg(rows.time.to_numpy(), rows[["x"]].to_numpy(), status=rows.event.to_numpy(), ties="breslow",
                strata=rows.site.to_numpy()).fit()
    log_hr, _ = weighted_breslow_cox(rows.time.to_numpy(), rows.event.to_numpy(), rows.x.to_numpy(),
                                     np.ones(len(rows)), rows.site.to_numpy())
    assert log_hr == pytest.approx(fit.params[0], rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_pooled_matching_reads_the_rules_as_the_brute_force_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 120
    site = pd.DataFrame({
        "person_id": rng.permutation(10_000)[:n], "treatment": (rng.random(n) < 0.3).astype(int),
        "logit": np.round(rng.normal(0, 1, n), 1),  # coarse: ties in score and distance
    })
    t, c = site[site.treatment == 1], site[site.treatment == 0]
    expected = brute_force(t.person_id.to_numpy(), t.logit.to_numpy(), c.person_id.to_numpy(), c.logit.to_numpy(), 0.15)
    assert greedy_pairs(site, 0.15) == expected


def test_relative_differences_compare_counts_exactly_and_flag_missing_values() -> None:
    estimate = {"n_exposed": 10, "n_comparator": 20, "events_exposed": 3, "events_comparator": 4,
                "log_hr": 0.5, "se_log_hr": 0.1, "hr": 1.6487, "ci_low": 1.3, "ci_high": 2.0,
                "risk_exposed": 0.3, "risk_comparator": 0.2}
    pooled = {name: dict(estimate) for name in ("crude", "matched", "iptw_ate", "iptw_att", "overlap")}
    pooled["propensity"] = {"coefficients": [0.1, 0.2], "standard_errors": [0.01, 0.02], "caliper_logit": 0.05}
    federated = {
        "analyses": {**{name: dict(estimate) for name in pooled if name != "propensity"},
                     "crude": {**estimate, "n_exposed": 11, "hr": None}},
        "propensity": {"coefficients": {"(intercept)": 0.1, "age": 0.2 * (1 + 1e-12)},
                       "standard_errors": {"(intercept)": 0.01, "age": 0.02}, "caliper_logit": 0.05},
    }
    rows = {(r["analysis"], r["quantity"]): r for r in relative_differences(federated, pooled)}
    assert rows["crude", "n_exposed"]["rel_diff"] == pytest.approx(0.1)
    assert rows["crude", "hr"]["rel_diff"] is None
    assert rows["matched", "log_hr"]["rel_diff"] == 0.0
    assert rows["propensity", "coef age"]["rel_diff"] == pytest.approx(1e-12, rel=1e-3)


def test_tables_print_and_render_as_markdown() -> None:
    spec = table("Times", ["step", "seconds", "rows"], [["cohort", 12.3456, 1_234_567], ["tiny", 1e-7, None]], "a note")
    text = format_table(spec)
    assert "12.35" in text
    assert "1,234,567" in text
    assert "1.00e-07" in text
    assert "note: a note" in text
    md = markdown_table(spec)
    assert md.splitlines()[2] == "| step | seconds | rows |"
    assert "| cohort | 12.35 | 1,234,567 |" in md


def test_the_document_shows_the_latest_results_between_its_markers(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_result("paper_scale", "quick", {"patients": 100}, [table("T", ["a", "b"], [["x", 1.5]])], {},
                 results_dir=results)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\nprose\n{BEGIN}\nold\n{END}\nafter\n", encoding="utf-8")
    text = render(doc, results)
    assert "prose" in text
    assert "after" in text
    assert "old" not in text
    assert "mode **quick**" in text
    assert "| x | 1.5 |" in text
    assert "Not measured yet" in text  # the benchmarks without a result file say so
    saved = json.loads((results / "paper_scale.quick.json").read_text(encoding="utf-8"))
    assert saved["machine"]["cores"] >= 1
    assert saved["versions"]["flwr"]
    doc.write_text("no markers", encoding="utf-8")
    with pytest.raises(SystemExit, match="markers"):
        render(doc, results)
