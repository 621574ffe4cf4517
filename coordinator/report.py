"""report.html: a minimal, self-contained study report rendered from results.json.

Every number shown comes from results.json (and, in simulation, truth.json). No external
assets: it opens offline.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:90%}
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_fmt(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_report(results: dict[str, Any], truth: dict[str, Any] | None = None) -> str:
    """The report as one HTML string."""
    crude = results["analyses"]["crude"]
    parts = [
        f"<h1>{escape(results['title'])}</h1>",
        f"<p>Study <code>{escape(results['study_id'])}</code>, protocol SHA-256 "
        f"<code>{escape(results['protocol_sha256'])}</code>, {len(results['sites'])} sites, "
        f"generated {escape(results['generated_at'])}.</p>",
        f"<p><b>Crude hazard ratio (exposed vs comparator): {crude['hr']:.2f} "
        f"(95% CI {crude['ci_low']:.2f}-{crude['ci_high']:.2f})</b>, Cox model stratified by "
        f"site with treatment only; not adjusted for confounding.</p>",
        "<h2>Cohort per site</h2>",
        _table(
            ["site", "exposed", "comparator", "events exposed", "events comparator"],
            [[s["site_id"], s["n_exposed"], s["n_comparator"], s["events_exposed"], s["events_comparator"]]
             for s in results["sites"]],
        ),
        "<h2>Attrition</h2>",
    ]
    for site in results["sites"]:
        parts.append(f"<h3>{escape(site['site_id'])}</h3>")
        parts.append(_table(
            ["step", "persons", "exposed", "comparator"],
            [[a["description"], a["n_persons"], a["n_exposed"], a["n_comparator"]] for a in site["attrition"]],
        ))
    parts += [
        "<h2>Crude Cox model</h2>",
        _table(
            ["", "exposed", "comparator"],
            [["patients", crude["n_exposed"], crude["n_comparator"]],
             ["events", crude["events_exposed"], crude["events_comparator"]],
             ["person-days", crude["person_days_exposed"], crude["person_days_comparator"]]],
        ),
        _table(["HR", "95% CI low", "95% CI high", "SE log HR", "p", "Newton rounds"],
               [[crude["hr"], crude["ci_low"], crude["ci_high"], crude["se_log_hr"], crude["p_value"],
                 crude["newton_rounds"]]]),
    ]
    propensity = results.get("propensity")
    if propensity is not None:
        parts += [
            "<h2>Propensity model</h2>",
            f"<p class='note'>{escape(propensity['model'])}; L2 penalty {propensity['l2']}; "
            f"{propensity['newton_rounds']} Newton rounds over all sites.</p>",
            _table(["term", "coefficient", "SE"],
                   [[name, value, propensity["standard_errors"][name]]
                    for name, value in propensity["coefficients"].items()]),
        ]
    if truth is not None:
        marginal = truth.get("marginal_effect_in_treated", {})
        parts += [
            "<h2>Planted truth (simulation)</h2>",
            "<p class='note'>Synthetic data: the generator's true parameters. The crude HR is "
            "expected to be biased by the planted confounding.</p>",
            _table(["quantity", "value"],
                   [["conditional HR (planted)", truth.get("hr_conditional")],
                    *[[f"marginal {k} in the treated", v] for k, v in marginal.items()
                      if isinstance(v, int | float)]]),
        ]
    parts += [
        "<h2>Rounds</h2>",
        _table(["round", "seconds", "bytes sent", "bytes received"],
               [[r["name"], r["seconds"], r["bytes_sent"], r["bytes_received"]] for r in results["rounds"]]),
        "<h2>Software</h2>",
        _table(["package", "version"], [[k, v] for k, v in results["software"].items()]),
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(results['study_id'])} - fedrwe report</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def write_report(path: Path, results: dict[str, Any], truth: dict[str, Any] | None = None) -> None:
    path.write_text(render_report(results, truth), encoding="utf-8")
