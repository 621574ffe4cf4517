"""The minimal report: every section present, numbers from results.json, nothing external."""

from __future__ import annotations

from typing import Any

from coordinator.report import render_report


def results() -> dict[str, Any]:
    crude = {
        "hr": 3.2549, "ci_low": 2.807, "ci_high": 3.775, "se_log_hr": 0.0756, "p_value": 1e-50,
        "newton_rounds": 2, "n_exposed": 1245, "n_comparator": 5928, "events_exposed": 283,
        "events_comparator": 483, "person_days_exposed": 400_000, "person_days_comparator": 1_900_000,
    }
    site = {
        "site_id": "site_01", "n_exposed": 1245, "n_comparator": 5928, "events_exposed": 283,
        "events_comparator": 483,
        "attrition": [{"step": "arm", "description": "first exposure", "n_persons": None,
                       "n_exposed": None, "n_comparator": 6000, "suppressed": True}],
    }
    return {
        "title": "Ketamine <and> CUD", "study_id": "s", "protocol_sha256": "ab" * 32,
        "generated_at": "2026-11-27T00:00:00+00:00", "sites": [site], "analyses": {"crude": crude},
        "propensity": {"model": "logistic", "l2": 0.0, "newton_rounds": 4,
                       "coefficients": {"(intercept)": -0.75}, "standard_errors": {"(intercept)": 0.1}},
        "rounds": [{"name": "1-summary", "seconds": 66.0, "bytes_sent": 7941, "bytes_received": 4410}],
        "software": {"flwr": "1.42.0"},
    }


def test_report_has_every_section_and_escapes_text() -> None:
    html = render_report(results(), truth={"hr_conditional": 1.98, "marginal_effect_in_treated": {"risk_ratio": 1.78}})
    for section in ("Cohort per site", "Attrition", "Crude Cox model", "Propensity model",
                    "Planted truth", "Rounds", "Software"):
        assert f"<h2>{section}" in html
    assert "3.25 (95% CI 2.81-3.77)" in html
    assert "Ketamine &lt;and&gt; CUD" in html
    assert "http" not in html
    assert "src=" not in html
