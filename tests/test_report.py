"""The minimal report: every section present, numbers from results.json, nothing external."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from coordinator.report import render_report, write_report


def results() -> dict[str, Any]:
    crude = {
        "hr": 3.2549, "ci_low": 2.807, "ci_high": 3.775, "se_log_hr": 0.0756, "p_value": 1e-50,
        "newton_rounds": 2, "n_exposed": 1245, "n_comparator": 5928, "events_exposed": 283,
        "events_comparator": 483, "person_days_exposed": 400_000, "person_days_comparator": 1_900_000,
    }
    matched = {
        "hr": 1.8125, "ci_low": 1.4391, "ci_high": 2.2828, "se_log_hr": 0.118, "n_exposed": 1171,
        "n_comparator": 1171, "events_exposed": 247, "events_comparator": 141, "risk_exposed": 0.2385,
        "risk_comparator": 0.1362, "risk_ratio": 1.751, "risk_ratio_ci_low": 1.4, "risk_ratio_ci_high": 2.1,
        "risk_difference": 0.1023, "risk_difference_ci_low": 0.07, "risk_difference_ci_high": 0.13,
        "logrank_p": 1e-6, "ph_check": {"p_value": 0.83}, "horizon_days": 365, "weights": "1:1 matching",
    }
    site = {
        "site_id": "site_01", "n_exposed": 1245, "n_comparator": 5928, "events_exposed": 283,
        "events_comparator": 483,
        "attrition": [{"step": "arm", "description": "first exposure", "n_persons": None,
                       "n_exposed": None, "n_comparator": 6000, "suppressed": True}],
    }
    return {
        "title": "Ketamine <and> CUD", "study_id": "s", "protocol_sha256": "ab" * 32,
        "generated_at": "2026-11-27T00:00:00+00:00", "sites": [site],
        "analyses": {"crude": crude, "matched": matched, "overlap": {"error": "no events <here>", "n_exposed": 0,
                                                                      "n_comparator": 0}},
        "balance": {"covariates": {"age": {"before": {"smd": 0.41}, "matched": {"smd": 0.02}}},
                    "max_abs_smd": {"before": 0.41, "matched": 0.02}},
        "meta": {"matched": {"sites": [{"site_id": "site_01", "hr": 1.81}], "i_squared": 0.0, "tau_squared": 0.0,
                             "fixed": {"estimate": 0.5933, "ci_low": 0.3640, "ci_high": 0.8253},
                             "random": {"estimate": 0.5933, "ci_low": 0.3640, "ci_high": 0.8253}}},
        "propensity": {"model": "logistic", "l2": 0.0, "newton_rounds": 4,
                       "coefficients": {"(intercept)": -0.75}, "standard_errors": {"(intercept)": 0.1}},
        "rounds": [{"name": "1-summary", "seconds": 66.0, "bytes_sent": 7941, "bytes_received": 4410}],
        "software": {"flwr": "1.42.0"},
    }


def test_report_has_every_section_and_escapes_text() -> None:
    html = render_report(results(), truth={"hr_conditional": 1.98, "marginal_effect_in_treated": {"risk_ratio": 1.78}})
    for section in ("Cohort per site", "Attrition", "Results", "Crude Cox model", "Covariate balance",
                    "Per-site estimates and meta-analysis", "Propensity model", "Planted truth", "Rounds", "Software"):
        assert re.search(f"<h2 id='[^']*'>{section}", html), section
    assert "matched analysis (exposed vs comparator): <span data-key='headline-hr'>1.81 (1.44-2.28)</span>" in html
    assert "3.25 (2.81-3.77)" in html  # crude, in the results table
    assert "1.75 (1.40-2.10)" in html  # risk ratio
    assert "no estimate: no events &lt;here&gt;" in html
    assert "Ketamine &lt;and&gt; CUD" in html
    assert "http" not in html
    assert "src=" not in html


def test_write_report_saves_each_inline_figure_as_svg(tmp_path: Path) -> None:
    write_report(tmp_path / "report.html", results(), truth={"hr_conditional": 1.98})
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    saved = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert saved == ["forest.svg", "love_plot.svg"]  # no KM tables or PS histogram in these results
    for name in saved:
        svg = (tmp_path / "figures" / name).read_text(encoding="utf-8")
        assert svg.startswith("<?xml")
        assert "xmlns='http://www.w3.org/2000/svg'" in svg
        assert svg.split("<svg ", 1)[1].split(">", 1)[1].strip() in html  # the same drawing, inline
    assert ">matched: pooled (federated)</text>" in html


def test_several_comparisons_with_participation_and_a_failed_one() -> None:
    body = {k: v for k, v in results().items() if k not in ("title", "study_id", "protocol_sha256",
                                                            "generated_at", "software")}
    dropped = {"site_id": "site_02", "comparison": "b", "round_name": "b/1-summary", "status": "error",
               "reason": "disk full"}
    study = {
        **{k: results()[k] for k in ("title", "study_id", "protocol_sha256", "generated_at", "software")},
        "comparisons": [
            {"comparison_id": "a", "title": "A", **body,
             "participation": {"sites": ["site_01"], "attempts": 1, "dropped": []}},
            {"comparison_id": "b", "title": "B", "error": "InsufficientSites: no quorum",
             "participation": {"dropped": [dropped]}},
        ],
    }
    html = render_report(study, truth={"hr_conditional": 1.98})
    assert "<span data-key='a-hr-matched'>1.81 (1.44-2.28)</span>" in html
    assert "<span data-key='a-participation-sites'>site_01</span>" in html
    assert "site_02 (b/1-summary: error, disk full)" in html
    assert "This comparison has no results:</b> InsufficientSites: no quorum" in html
    assert html.count("<h2 id='a-results'>Results</h2>") == 1
    assert "<h2 id='b-results'>" not in html
