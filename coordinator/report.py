"""report.html: a minimal, self-contained study report rendered from results.json.

Every number shown comes from results.json (and, in simulation, truth.json). No external
assets: it opens offline.
"""

from __future__ import annotations

from html import escape
from math import exp
from pathlib import Path
from typing import Any

from coordinator.results import comparison_views

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


def _ci(estimate: Any, low: Any, high: Any) -> str:
    if estimate is None:
        return "-"
    return f"{estimate:.2f} ({low:.2f}-{high:.2f})"


def _disclosure_notes(sites: list[dict[str, Any]]) -> list[str]:
    """One note per site whose policy suppressed or noised counts ('-' cells are suppressed)."""
    notes = []
    for site in sites:
        label = site.get("disclosure") or {}
        if label.get("suppressed"):
            notes.append(f"site {site['site_id']} suppressed (below its minimum cell count): "
                         f"{', '.join(label['suppressed'])}")
        if label.get("noise"):
            notes.append(f"site {site['site_id']} added Laplace noise (epsilon {label['noise']['epsilon']:g}) "
                         f"to: {', '.join(label['noise']['counts'])}; estimates are approximate")
    return [f"<p class='note'>{escape(note)}</p>" for note in notes]


def _headline(results: dict[str, Any]) -> str:
    """The primary analysis in one sentence (the protocol's first adjusted analysis, else crude)."""
    analyses = results["analyses"]
    name = next((n for n in analyses if n != "crude"), "crude")
    analysis = analyses[name]
    if "error" in analysis:
        return f"<p><b>The {escape(name)} analysis has no estimate:</b> {escape(analysis['error'])}</p>"
    return (
        f"<p><b>Hazard ratio, {escape(name)} analysis (exposed vs comparator): "
        f"{_ci(analysis['hr'], analysis['ci_low'], analysis['ci_high'])}</b>; "
        f"{escape(analysis.get('weights', analysis.get('model', '')))}.</p>"
    )


def _main_table(results: dict[str, Any]) -> str:
    """One row per analysis, in the shape of the reference paper's results table."""
    rows = []
    for name, a in results["analyses"].items():
        if "error" in a:
            rows.append([name, a.get("n_exposed"), a.get("n_comparator"), a.get("events_exposed"),
                         a.get("events_comparator"), "-", "-", "-", "-", f"no estimate: {a['error']}", "-", "-"])
            continue
        rows.append([
            name, a["n_exposed"], a["n_comparator"], a["events_exposed"], a["events_comparator"],
            a.get("risk_exposed"), a.get("risk_comparator"),
            _ci(a.get("risk_ratio"), a.get("risk_ratio_ci_low"), a.get("risk_ratio_ci_high")),
            _ci(a.get("risk_difference"), a.get("risk_difference_ci_low"), a.get("risk_difference_ci_high")),
            _ci(a["hr"], a["ci_low"], a["ci_high"]), a.get("logrank_p"), a.get("ph_check", {}).get("p_value"),
        ])
    return _table(
        ["analysis", "n exposed", "n comparator", "events exposed", "events comparator", "risk exposed",
         "risk comparator", "risk ratio (95% CI)", "risk difference (95% CI)", "HR (95% CI)", "log-rank p",
         "PH check p"],
        rows,
    )


def _balance_table(balance: dict[str, Any]) -> str:
    labels = list(balance["max_abs_smd"])
    rows = [[column, *[(entry.get(label) or {}).get("smd") for label in labels]]
            for column, entry in balance["covariates"].items()]
    rows.append(["max |SMD|", *[balance["max_abs_smd"][label] for label in labels]])
    return _table(["covariate", *[f"SMD {label}" for label in labels]], rows)


def _meta_table(meta: dict[str, Any]) -> str:
    rows = []
    for name, entry in meta.items():
        sites = "; ".join(f"{s['site_id']} {s['hr']:.2f}" for s in entry["sites"])
        if "fixed" not in entry:
            rows.append([name, sites, "-", "-", "-", "-"])
            continue
        fixed, random = entry["fixed"], entry["random"]
        rows.append([
            name, sites, _ci(exp(fixed["estimate"]), exp(fixed["ci_low"]), exp(fixed["ci_high"])),
            _ci(exp(random["estimate"]), exp(random["ci_low"]), exp(random["ci_high"])),
            entry["i_squared"], entry["tau_squared"],
        ])
    return _table(["analysis", "per-site HR", "fixed effect HR (95% CI)", "random effects HR (95% CI)",
                   "I^2", "tau^2"], rows)


def _comparison_parts(results: dict[str, Any]) -> list[str]:
    """The sections of one comparison: cohorts, attrition, estimates, balance, models."""
    crude = results["analyses"]["crude"]
    parts = [
        _headline(results),
        "<h2>Cohort per site</h2>",
        _table(
            ["site", "exposed", "comparator", "events exposed", "events comparator"],
            [[s["site_id"], s["n_exposed"], s["n_comparator"], s["events_exposed"], s["events_comparator"]]
             for s in results["sites"]],
        ),
        *_disclosure_notes(results["sites"]),
        "<h2>Attrition</h2>",
    ]
    for site in results["sites"]:
        parts.append(f"<h3>{escape(site['site_id'])}</h3>")
        parts.append(_table(
            ["step", "persons", "exposed", "comparator"],
            [[a["description"], a["n_persons"], a["n_exposed"], a["n_comparator"]] for a in site["attrition"]],
        ))
    parts += [
        "<h2>Results</h2>",
        "<p class='note'>Risks by day "
        f"{escape(str(next(iter(results['analyses'].values())).get('horizon_days', '-')))} from Kaplan-Meier "
        "curves; hazard ratios from Cox models (Breslow ties) stratified by site, or by matched set for "
        "matching; robust variances for weighted fits.</p>",
        _main_table(results),
        "<h2>Crude Cox model</h2>",
        _table(
            ["", "exposed", "comparator"],
            [["patients", crude["n_exposed"], crude["n_comparator"]],
             ["events", crude["events_exposed"], crude["events_comparator"]],
             ["person-days", crude["person_days_exposed"], crude["person_days_comparator"]]],
        ),
        _table(["HR", "95% CI low", "95% CI high", "SE log HR", "p", "Newton rounds"],
               [[crude.get("hr"), crude.get("ci_low"), crude.get("ci_high"), crude.get("se_log_hr"),
                 crude.get("p_value"), crude.get("newton_rounds")]]),
    ]
    if "balance" in results:
        parts += ["<h2>Covariate balance</h2>", _balance_table(results["balance"])]
    if "meta" in results:
        parts += ["<h2>Per-site estimates and meta-analysis</h2>", _meta_table(results["meta"])]
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
    return parts


def render_report(results: dict[str, Any], truth: dict[str, Any] | None = None) -> str:
    """The report as one HTML string (one part per comparison when the study has several)."""
    views = comparison_views(results)
    parts = [
        f"<h1>{escape(results['title'])}</h1>",
        f"<p>Study <code>{escape(results['study_id'])}</code>, protocol SHA-256 "
        f"<code>{escape(results['protocol_sha256'])}</code>, "
        f"{max(len(view.get('sites', [])) for view in views)} sites, "
        f"generated {escape(results['generated_at'])}.</p>",
    ]
    for view in views:
        if view["comparison_id"] is not None:
            parts.append(f"<h1>Comparison <code>{escape(view['comparison_id'])}</code>: {escape(view['title'])}</h1>")
        if "error" in view:
            parts.append(f"<p><b>This comparison has no results:</b> {escape(view['error'])}</p>")
        else:
            parts += _comparison_parts(view)
    parts = [
        *parts, *_truth_parts(truth),
        "<h2>Rounds</h2>",
        _table(["round", "seconds", "bytes sent", "bytes received"],
               [[r["name"], r["seconds"], r["bytes_sent"], r["bytes_received"]]
                for view in views for r in view.get("rounds", [])]),
        "<h2>Software</h2>",
        _table(["package", "version"], [[k, v] for k, v in results["software"].items()]),
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(results['study_id'])} - fedrwe report</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def _truth_parts(truth: dict[str, Any] | None) -> list[str]:
    """In simulation: the generator's planted parameters (comparison A's, and those of the
    other comparisons it plants, by comparison id)."""
    if truth is None:
        return []
    rows = [["conditional HR (planted), ketamine vs other anaesthetics", truth.get("hr_conditional")]]
    rows += [[f"marginal {k} in the treated", v] for k, v in truth.get("marginal_effect_in_treated", {}).items()
             if isinstance(v, int | float)]
    rows += [[f"conditional HR (planted), comparison {cid}", planted.get("hr_conditional")]
             for cid, planted in truth.get("comparisons", {}).items()]
    return [
        "<h2>Planted truth (simulation)</h2>",
        "<p class='note'>Synthetic data: the generator's true parameters; the crude HRs are "
        "expected to be biased by the planted confounding. Comparisons not listed here have no "
        "planted truth.</p>",
        _table(["quantity", "value"], rows),
    ]


def write_report(path: Path, results: dict[str, Any], truth: dict[str, Any] | None = None) -> None:
    path.write_text(render_report(results, truth), encoding="utf-8")
