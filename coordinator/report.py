"""report.html: the study report, self-contained, rendered from results.json only.

Every number shown comes from results.json (and, in simulation, truth.json). No external
assets: styles and figures (inline SVG, coordinator/report_figures.py) are in the page, so
it opens offline and prints on A4. ``write_report`` also saves each figure as an .svg file
in ``figures/`` next to report.html.

Key numbers carry a ``data-key`` attribute (e.g. ``hr-matched``, ``n_exposed-matched``,
prefixed by the comparison id when the study has several) so tests can read them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from math import exp
from pathlib import Path
from typing import Any

from coordinator.report_figures import (
    ForestRow,
    forest_figure,
    km_figure,
    love_figure,
    propensity_figure,
)
from coordinator.results import comparison_views

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1140px;margin:1.5em auto;
 padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:2px;margin-top:1.6em}
h3{font-size:1em}code{font-size:90%;word-break:break-all}
table{border-collapse:collapse;margin:.6em 0;font-size:85%}td,th{border:1px solid #ccc;padding:2px 5px;
 text-align:right}th{background:#f3f3f3}td.n{white-space:nowrap}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:90%}.headline{font-size:1.1em;background:#f6f8fa;border-left:4px solid #2471a3;
 padding:.5em .8em}figure{margin:.8em 0;break-inside:avoid}figcaption{font-size:90%;color:#555}
svg{max-width:100%;height:auto}nav{font-size:90%;columns:2}.wide{overflow-x:auto}
@page{size:A4;margin:14mm}
@media print{body{max-width:none;margin:0;font-size:10pt}table{font-size:7pt}td,th{padding:1px 3px}td.n{white-space:normal}nav{display:none}.wide{overflow:visible}
 h2{break-after:avoid}table,figure{break-inside:avoid}a{color:inherit;text-decoration:none}}
"""


@dataclass
class _Page:
    """The report being built: its HTML parts, its figures and its table of contents."""

    parts: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    toc: list[tuple[str, str]] = field(default_factory=list)

    def heading(self, text: str, anchor: str, level: int = 2) -> None:
        if level == 2:
            self.toc.append((anchor, text))
        self.parts.append(f"<h{level} id='{escape(anchor)}'>{escape(text)}</h{level}>")

    def figure(self, name: str, svg: str, caption: str) -> None:
        self.figures[name] = svg
        self.parts.append(f"<figure id='fig-{escape(name)}'>{svg}<figcaption>{escape(caption)} "
                          f"(figures/{escape(name)}.svg)</figcaption></figure>")

    def note(self, text: str) -> None:
        self.parts.append(f"<p class='note'>{escape(text)}</p>")


def _cell(value: Any) -> str:
    if isinstance(value, _Keyed):
        return f"<span data-key='{escape(value.key)}'>{escape(value.text)}</span>"
    return escape(_fmt(value))


@dataclass(frozen=True)
class _Keyed:
    """A displayed value tests can find by its ``data-key``."""

    key: str
    text: str


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table>{head}{body}</table></div>"


def _td(cell: Any) -> str:
    """A cell; short ones (numbers, estimates with CIs) do not wrap."""
    text = _cell(cell)
    return f"<td class='n'>{text}</td>" if len(cell.text if isinstance(cell, _Keyed) else text) <= 24 else f"<td>{text}</td>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) < 0.0005:
            return "0.000"  # no "-0.000"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _p(value: Any) -> str:
    """A p-value: three decimals, or "<0.001"."""
    if isinstance(value, float) and value < 0.001:
        return "<0.001"
    return _fmt(value)


def _count(value: Any) -> str:
    """A count, or a weighted count with one decimal."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return _fmt(int(value)) if isinstance(value, float) else _fmt(value)


def _ci(estimate: Any, low: Any, high: Any) -> str:
    if estimate is None:
        return "-"
    return f"{estimate:.2f} ({low:.2f}-{high:.2f})"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def _primary(analyses: dict[str, Any]) -> str:
    """The protocol's first adjusted analysis, else crude."""
    return next((n for n in analyses if n != "crude"), "crude")


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


def _headline(results: dict[str, Any], prefix: str) -> str:
    """The main estimate in one sentence: the primary analysis, or, when a site withheld it,
    the first analysis with an estimate (saying why the primary has none)."""
    analyses = results["analyses"]
    name = _primary(analyses)
    missing = ""
    if "error" in analyses[name]:
        missing = (f"<p class='headline'><b>The {escape(name)} analysis has no estimate:</b> "
                   f"{escape(analyses[name]['error'])}</p>")
        name = next((n for n, a in analyses.items() if n != "crude" and "error" not in a), "")
        if not name:
            return missing
    analysis = analyses[name]
    hr = _ci(analysis["hr"], analysis["ci_low"], analysis["ci_high"])
    return missing + (
        f"<p class='headline'><b>Hazard ratio, {escape(name)} analysis (exposed vs comparator): "
        f"<span data-key='{escape(_key(prefix, 'headline-hr'))}'>{hr}</span></b>; "
        f"{escape(analysis.get('weights', analysis.get('model', '')))}; "
        f"{_fmt(analysis['n_exposed'])} exposed and {_fmt(analysis['n_comparator'])} comparator patients, "
        f"{_fmt(analysis['events_exposed'])} and {_fmt(analysis['events_comparator'])} events.</p>"
    )


def _main_table(results: dict[str, Any], prefix: str) -> str:
    """One row per analysis, in the shape of the reference paper's results table."""
    rows = []
    for name, a in results["analyses"].items():
        if "error" in a:
            rows.append([name, a.get("n_exposed"), a.get("n_comparator"), a.get("events_exposed"),
                         a.get("events_comparator"), "-", "-", "-", "-", "none (see below)", "-", "-"])
            continue
        rows.append([
            name,
            *[_Keyed(_key(prefix, f"{f}-{name}"), _fmt(a[f]))
              for f in ("n_exposed", "n_comparator", "events_exposed", "events_comparator")],
            a.get("risk_exposed"), a.get("risk_comparator"),
            _ci(a.get("risk_ratio"), a.get("risk_ratio_ci_low"), a.get("risk_ratio_ci_high")),
            _ci(a.get("risk_difference"), a.get("risk_difference_ci_low"), a.get("risk_difference_ci_high")),
            _Keyed(_key(prefix, f"hr-{name}"), _ci(a["hr"], a["ci_low"], a["ci_high"])),
            _p(a.get("logrank_p")), _p(a.get("ph_check", {}).get("p_value")),
        ])
    notes = "".join(f"<p class='note'>{escape(name)}: no estimate: {escape(a['error'])}</p>"
                    for name, a in results["analyses"].items() if "error" in a)
    return _table(
        ["analysis", "n exposed", "n comparator", "events exposed", "events comparator", "risk exposed",
         "risk comparator", "risk ratio (95% CI)", "risk difference (95% CI)", "HR (95% CI)", "log-rank p",
         "PH check p"],
        rows,
    ) + notes


def _attrition(page: _Page, sites: list[dict[str, Any]], anchor: str) -> None:
    page.heading("Attrition", f"{anchor}attrition")
    for site in sites:
        page.parts.append(f"<h3>{escape(site['site_id'])}</h3>")
        page.parts.append(_table(
            ["step", "persons", "exposed", "comparator"],
            [[a["description"], a["n_persons"], a["n_exposed"], a["n_comparator"]] for a in site["attrition"]],
        ))
    steps = [(a["step"], a["description"]) for a in (sites[0]["attrition"] if sites else [])]
    rows = []
    for step, description in steps:
        cells = [[a for a in s["attrition"] if a["step"] == step] for s in sites]
        row: list[Any] = [description]
        for column in ("n_persons", "n_exposed", "n_comparator"):
            values = [c[0].get(column) if c else None for c in cells]
            row.append(sum(values) if all(isinstance(v, int) for v in values) else None)
        rows.append(row)
    page.parts.append("<h3>All sites</h3>")
    page.parts.append(_table(["step", "persons", "exposed", "comparator"], rows))
    page.note("All sites: sums over the sites; '-' where a site suppressed or did not count the cell.")


def _balance(page: _Page, balance: dict[str, Any], anchor: str, slug: str) -> None:
    labels = list(balance["max_abs_smd"])
    adjusted = [label for label in labels if label != "before"]
    shown = ["before", *adjusted[:1]]
    header = ["covariate"]
    for label in shown:
        header += [f"{label}: mean exposed", f"{label}: mean comparator", f"{label}: SMD"]
    header += [f"SMD {label}" for label in adjusted[1:]]
    rows = []
    for column, entry in balance["covariates"].items():
        row: list[Any] = [column]
        for label in shown:
            cell = entry.get(label) or {}
            row += [cell.get("mean_exposed"), cell.get("mean_comparator"), cell.get("smd")]
        row += [(entry.get(label) or {}).get("smd") for label in adjusted[1:]]
        rows.append(row)
    rows.append(["max |SMD|", *[v for label in shown for v in (None, None, balance["max_abs_smd"][label])],
                 *[balance["max_abs_smd"][label] for label in adjusted[1:]]])
    page.heading("Covariate balance: Table 1", f"{anchor}balance")
    page.note("Baseline characteristics per arm before and after matching / weighting: means "
              "(proportions for yes/no covariates) and standardized mean differences; balanced when "
              f"|SMD| < 0.1. {balance.get('smd_definition', '')}")
    page.parts.append(_table(header, rows))
    page.figure(f"{slug}love_plot", love_figure(balance, "Love plot"),
                "Love plot: |SMD| per covariate before and after each adjustment; dashed line at 0.1.")


def _propensity(page: _Page, propensity: dict[str, Any], anchor: str, slug: str) -> None:
    page.heading("Propensity model", f"{anchor}propensity")
    page.note(f"{propensity['model']}; L2 penalty {propensity['l2']}; {propensity['newton_rounds']} "
              "Newton rounds over all sites.")
    histogram = propensity.get("histogram")
    if histogram is not None:
        page.figure(f"{slug}propensity", propensity_figure(histogram, "Propensity score distribution"),
                    "Propensity score distribution per arm (overlap), before matching or weighting; "
                    "grey ticks mark bins a site suppressed.")
        page.parts.append(_table(
            ["c-statistic", "definition", "all pairs", "note"],
            [[histogram.get("c_statistic"), histogram.get("c_statistic_definition"),
              histogram.get("c_statistic_all_pairs"), histogram.get("c_statistic_all_pairs_note")]],
        ))
    page.parts.append(_table(["term", "coefficient", "SE"],
                             [[name, value, propensity["standard_errors"][name]]
                              for name, value in propensity["coefficients"].items()]))


def _at_risk(table: dict[str, list[Any]], day: float) -> Any:
    """Number at risk at the first event time on or after ``day`` (None after the last)."""
    return next((n for t, n in zip(table["time"], table["at_risk"], strict=True) if t >= day), None)


def _kaplan_meier(page: _Page, analyses: dict[str, Any], anchor: str, slug: str) -> None:
    page.heading("Kaplan-Meier curves", f"{anchor}km")
    page.note("Cumulative incidence of the outcome (1 - Kaplan-Meier survival) per arm with pointwise 95% "
              "CI bands (weighted for weighting analyses). Numbers at risk: the arm's (weighted) size at day 0, "
              "then the number at risk at the first event time on or after the day shown ('-': no event "
              "after that day); weighted numbers for weighting analyses.")
    for name, analysis in analyses.items():
        km = analysis.get("km")
        if not km:
            continue
        horizon = float(analysis.get("horizon_days") or max(max(t["time"], default=1) for t in km.values()))
        page.parts.append(f"<h3>{escape(name)}</h3>")
        page.figure(f"{slug}km_{name}", km_figure(km, horizon, f"Kaplan-Meier, {name}"),
                    f"Kaplan-Meier cumulative incidence, {name} analysis.")
        days = [float(d) for d in range(90, int(horizon) + 1, 90)] if horizon >= 180 else [horizon / 2]
        page.parts.append(_table(
            ["at risk", "day 0", *[f"day {d:.0f}" for d in days]],
            [[arm, _count(analysis.get(f"weighted_n_{arm}", analysis.get(f"n_{arm}"))),
              *[_count(_at_risk(table, d)) for d in days]] for arm, table in km.items()],
        ))


def _forest(page: _Page, results: dict[str, Any], anchor: str, slug: str) -> None:
    meta = results.get("meta") or {}
    rows: list[ForestRow] = []
    for name, analysis in results["analyses"].items():
        if "error" in analysis:
            continue
        entry = meta.get(name) or {}
        rows += [ForestRow(f"{name}: {s['site_id']}", s["hr"], exp(s["log_hr"] - 1.96 * s["se_log_hr"]),
                           exp(s["log_hr"] + 1.96 * s["se_log_hr"]))
                 for s in entry.get("sites", []) if "se_log_hr" in s]
        rows.append(ForestRow(f"{name}: pooled (federated)", analysis["hr"], analysis["ci_low"],
                              analysis["ci_high"], pooled=True))
        for kind in ("fixed", "random"):
            if kind in entry:
                e = entry[kind]
                rows.append(ForestRow(f"{name}: {kind}-effect meta", exp(e["estimate"]), exp(e["ci_low"]),
                                      exp(e["ci_high"]), pooled=True))
    if rows:
        page.figure(f"{slug}forest", forest_figure(rows, "Forest plot"),
                    "Hazard ratios with 95% CI: per site (squares, Wald CIs from each site's log HR and "
                    "SE), pooled federated estimate and fixed / random effects meta-analyses (diamonds).")


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


def _ph_check(page: _Page, analyses: dict[str, Any], anchor: str) -> None:
    page.heading("Proportional hazards check", f"{anchor}ph")
    rows = []
    for name, analysis in analyses.items():
        check = analysis.get("ph_check")
        if not check or "windows" not in check:
            continue
        windows = "; ".join(
            f"days {w['start_day']}-{'end' if w['end_day'] is None else w['end_day']}: "
            f"{'-' if w.get('hr') is None else format(w['hr'], '.2f')}" for w in check["windows"])
        rows.append([name, windows, check.get("statistic"), check.get("df"), _p(check.get("p_value"))])
    methods = sorted({a["ph_check"]["method"] for a in analyses.values() if "method" in a.get("ph_check", {})})
    if methods:
        page.note("Method: " + " / ".join(methods) + ". A small p suggests the hazard ratio changes over follow-up.")
    page.parts.append(_table(["analysis", "HR per follow-up window", "Wald statistic", "df", "p"], rows)
                      if rows else "<p class='note'>No proportional hazards check in results.json.</p>")


def _privacy(page: _Page, results: dict[str, Any], anchor: str) -> None:
    page.heading("Privacy", f"{anchor}privacy")
    rows = []
    for site in results["sites"]:
        label = site.get("disclosure") or {}
        provenance = site.get("provenance") or {}
        noise = label.get("noise")
        rows.append([
            site["site_id"], ", ".join(label.get("suppressed") or []) or "nothing",
            f"Laplace, epsilon {noise['epsilon']:g}: {', '.join(noise['counts'])}" if noise else "none",
            provenance.get("time_grid"), provenance.get("event_tables_allowed"),
        ])
    page.parts.append(_table(["site", "suppressed (below its minimum cell count)", "noise", "time grid",
                              "event tables allowed"], rows))
    page.note("Only aggregates left the sites; cells shown as '-' were suppressed by the site's own policy. "
              "Noised counts make estimates approximate.")
    secure = results.get("secure_aggregation")
    if secure:
        page.note(f"Secure aggregation over {', '.join(secure['sites'])} for {', '.join(secure['masked_tasks'])}: "
                  f"{secure['note']}.")


def _provenance(page: _Page, results: dict[str, Any], anchor: str) -> None:
    page.heading("Provenance", f"{anchor}provenance")
    rows = []
    for site in results["sites"]:
        p = site.get("provenance") or {}
        inputs = ", ".join(f"{t} v{v}" for t, v in (p.get("input_versions") or {}).items())
        rows.append([site["site_id"], p.get("dataset_version"), p.get("dataset_rebuilt"), inputs or "-"])
    page.parts.append(_table(["site", "cohort dataset version", "rebuilt", "OMOP Delta table versions"], rows))


def _quorum(quorum: dict[str, Any] | None) -> str:
    if not quorum:
        return "-"
    required = ", ".join(quorum.get("required_sites") or []) or "none"
    return f"at least {quorum.get('min_sites')} site(s); required: {required}"


def _comparison(page: _Page, results: dict[str, Any], prefix: str, anchor: str) -> None:
    """The sections of one comparison."""
    slug = prefix.replace("-", "_")
    if "error" not in results:
        page.parts.append(_headline(results, prefix))
    participation = results.get("participation")
    if participation is not None:
        dropped = participation.get("dropped") or []
        page.heading("Participation", f"{anchor}participation")
        page.parts.append(_table(
            ["sites used", "attempts", "dropped sites", "quorum"],
            [[_Keyed(_key(prefix, "participation-sites"), ", ".join(participation.get("sites", [])) or "-"),
              participation.get("attempts"),
              "; ".join(f"{d['site_id']} ({d['round_name']}: {d['status']}, {d['reason']})" for d in dropped)
              or "none", _quorum(results.get("quorum"))]],
        ))
    if "error" in results:
        page.parts.append(f"<p><b>This comparison has no results:</b> {escape(results['error'])}</p>")
        return
    page.heading("Cohort per site", f"{anchor}cohort")
    page.parts.append(_table(
        ["site", "exposed", "comparator", "events exposed", "events comparator"],
        [[s["site_id"], s["n_exposed"], s["n_comparator"], s["events_exposed"], s["events_comparator"]]
         for s in results["sites"]],
    ))
    page.parts += _disclosure_notes(results["sites"])
    _attrition(page, results["sites"], anchor)
    analyses = results["analyses"]
    page.heading("Results", f"{anchor}results")
    page.note(f"Risks by day {next(iter(analyses.values())).get('horizon_days', '-')} from Kaplan-Meier "
              "curves; hazard ratios from Cox models (Breslow ties) stratified by site, or by matched set "
              "for matching; robust variances for weighted fits.")
    page.parts.append(_main_table(results, prefix))
    if "meta" in results:
        page.heading("Per-site estimates and meta-analysis", f"{anchor}meta")
        page.parts.append(_meta_table(results["meta"]))
    _forest(page, results, anchor, slug)
    if "balance" in results:
        _balance(page, results["balance"], anchor, slug)
    if results.get("propensity") is not None:
        _propensity(page, results["propensity"], anchor, slug)
    _kaplan_meier(page, analyses, anchor, slug)
    _ph_check(page, analyses, anchor)
    crude = analyses["crude"]
    page.heading("Crude Cox model", f"{anchor}crude")
    page.parts.append(_table(
        ["", "exposed", "comparator"],
        [["patients", crude.get("n_exposed"), crude.get("n_comparator")],
         ["events", crude.get("events_exposed"), crude.get("events_comparator")],
         ["person-days", crude.get("person_days_exposed"), crude.get("person_days_comparator")]],
    ))
    page.parts.append(_table(["HR", "95% CI low", "95% CI high", "SE log HR", "p", "Newton rounds"],
                             [[crude.get("hr"), crude.get("ci_low"), crude.get("ci_high"), crude.get("se_log_hr"),
                               _p(crude.get("p_value")), crude.get("newton_rounds")]]))
    _privacy(page, results, anchor)
    _provenance(page, results, anchor)


def _render(results: dict[str, Any], truth: dict[str, Any] | None) -> _Page:
    views = comparison_views(results)
    page = _Page()
    sites = sorted({s["site_id"] for view in views for s in view.get("sites", [])})
    page.heading("Summary", "summary")
    page.parts.append(_table(None, [
        ["question", results["title"]], ["study", results["study_id"]],
        ["protocol SHA-256", results["protocol_sha256"]],
        ["sites", f"{max((len(v.get('sites', [])) for v in views), default=0)} ({', '.join(sites) or '-'})"],
        ["generated", results["generated_at"]],
    ]))
    for view in views:
        cid = view["comparison_id"]
        prefix, anchor = ("", "") if cid is None else (f"{cid}-", f"{cid}-")
        if cid is not None:
            page.parts.append(f"<h1 id='{escape(cid)}'>Comparison <code>{escape(cid)}</code>: "
                              f"{escape(view['title'])}</h1>")
            page.toc.append((cid, f"Comparison {cid}"))
        _comparison(page, view, prefix, anchor)
    _truth(page, truth, views)
    approvals = results.get("site_approvals") or {}
    page.heading("Approvals", "approvals")
    page.parts.append(_table(["site", "mode", "note"],
                             [[site, a.get("mode"), a.get("note")] for site, a in sorted(approvals.items())])
                      if approvals else "<p class='note'>No site approvals recorded in results.json.</p>")
    envelopes = results.get("envelopes")
    if envelopes:
        page.note(f"Messages signed: {_fmt(envelopes.get('signed'))}; coordinator key "
                  f"{envelopes.get('coordinator_key_id')}; site keys "
                  + ", ".join(f"{s} {k}" for s, k in sorted((envelopes.get("site_key_ids") or {}).items())) + ".")
    page.heading("Rounds", "rounds")
    page.parts.append(_table(["comparison", "round", "seconds", "bytes sent", "bytes received"],
                             [[view["comparison_id"] or "-", r["name"], r["seconds"], r["bytes_sent"],
                               r["bytes_received"]] for view in views for r in view.get("rounds", [])]))
    page.heading("Software", "software")
    page.parts.append(_table(["package", "version"], [[k, v] for k, v in results["software"].items()]))
    return page


def _truth(page: _Page, truth: dict[str, Any] | None, views: list[dict[str, Any]]) -> None:
    """In simulation: the generator's planted parameters next to the estimates."""
    if truth is None:
        return
    page.heading("Planted truth (simulation)", "truth")
    page.note("Synthetic data: the generator's true parameters next to the federated estimates; the crude "
              "HRs are expected to be biased by the planted confounding. Comparisons without planted "
              "truth show '-'.")
    rows = [["conditional HR (planted), ketamine vs other anaesthetics", truth.get("hr_conditional")]]
    rows += [[f"marginal {k} in the treated", v] for k, v in truth.get("marginal_effect_in_treated", {}).items()
             if isinstance(v, int | float)]
    rows += [[f"conditional HR (planted), comparison {cid}", planted.get("hr_conditional")]
             for cid, planted in truth.get("comparisons", {}).items()]
    page.parts.append(_table(["quantity", "value"], rows))
    estimates = []
    for i, view in enumerate(views):
        cid = view["comparison_id"]
        planted = truth if (cid is None or i == 0) and cid not in truth.get("comparisons", {}) \
            else truth.get("comparisons", {}).get(cid or "", {})
        hr_true = planted.get("hr_conditional")
        rr_true = (planted.get("marginal_effect_in_treated") or {}).get("risk_ratio")
        for name, a in view.get("analyses", {}).items():
            if "error" in a:
                continue
            covers = None if hr_true is None else a["ci_low"] <= hr_true <= a["ci_high"]
            estimates.append([cid or "-", name, _ci(a["hr"], a["ci_low"], a["ci_high"]), hr_true, covers,
                              _ci(a.get("risk_ratio"), a.get("risk_ratio_ci_low"), a.get("risk_ratio_ci_high")),
                              rr_true])
    page.parts.append(_table(["comparison", "analysis", "HR (95% CI)", "planted conditional HR",
                              "CI contains it", "risk ratio (95% CI)", "planted marginal risk ratio (treated)"],
                             estimates))


def render_report(results: dict[str, Any], truth: dict[str, Any] | None = None) -> str:
    """The report as one HTML string (one part per comparison when the study has several)."""
    return _html(results, _render(results, truth))


def _html(results: dict[str, Any], page: _Page) -> str:
    toc = "".join(f"<li><a href='#{escape(a)}'>{escape(t)}</a></li>" for a, t in page.toc)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(results['study_id'])} - fedrwe report</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(results['title'])}</h1><nav><ol>{toc}</ol></nav>{''.join(page.parts)}</body></html>\n"
    )


_SVG_NAMESPACE = "<svg xmlns='http://www.w3.org/2000/svg' "


def write_report(path: Path, results: dict[str, Any], truth: dict[str, Any] | None = None) -> None:
    """Write report.html and its figures as ``figures/<name>.svg`` next to it."""
    page = _render(results, truth)
    path.write_text(_html(results, page), encoding="utf-8")
    folder = path.parent / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    for name, svg in page.figures.items():
        (folder / f"{name}.svg").write_text(
            "<?xml version='1.0' encoding='utf-8'?>\n" + svg.replace("<svg ", _SVG_NAMESPACE, 1) + "\n",
            encoding="utf-8")
