"""Central half of the propensity-score analyses (the site half: site_agent/analyses/adjusted.py).

From every site's aggregates of the adjusted round this computes, with no further
exchange: covariate balance before and after matching/weighting, the Cox hazard ratio
(site-stratified weighted Breslow with robust variance, or stratified by matched set),
Kaplan-Meier curves per arm, the log-rank test, risks at the horizon with their ratio
and difference, crude rates, the proportional-hazards check, per-site estimates and
their meta-analysis, and the propensity-score histogram with a binned c-statistic.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from coordinator import ph_check
from coordinator.fits import WeightedCoxFit
from coordinator.large_scale import concept_balance
from shared.errors import ConvergenceError
from shared.protocol.model import StudyProtocol
from shared.stats.balance import ArmMoments, standardized_differences
from shared.stats.cox import EventTable
from shared.stats.inference import wald_ratio
from shared.stats.km import KaplanMeier, kaplan_meier, logrank_test
from shared.stats.matched_cox import Configuration, configurations_from_json, fit_matched_cox
from shared.stats.meta import meta_analysis
from shared.stats.risks import contrast_risks, rate_per_1000_person_years, risk_at
from shared.stats.stratified_cox import (
    WeightedTable,
    WeightSquares,
    fit_stratified_cox,
    merge_weighted,
)

Partials = list[dict[str, Any]]  # the "adjusted" task's values from every site, in site order
_ARMS = ((1, "exposed"), (0, "comparator"))

DESCRIPTIONS = {
    "crude": "all rows, unweighted",
    "matched": "1:{ratio} greedy nearest-neighbour matching within site on the logit of the propensity "
               "score, caliper {caliper} SD of the logit over all sites; comparator rows weighted 1/set size",
    "iptw_ate": "inverse probability of treatment weights for the ATE ({stabilized})",
    "iptw_att": "inverse probability of treatment weights for the ATT (exposed 1, comparator e/(1-e))",
    "overlap": "overlap weights (exposed 1-e, comparator e)",
}


def _tables(parts: list[dict[str, Any]]) -> tuple[list[EventTable], list[WeightSquares]]:
    """The sites' event tables and squared-weight sums (parsed once, in :func:`combine`)."""
    return [p["table"].table for p in parts], [p["table"].squares for p in parts]


def _curve_json(curve: KaplanMeier) -> dict[str, list[float]]:
    return {
        "time": curve.time.tolist(), "at_risk": np.asarray(curve.at_risk, dtype=float).tolist(),
        "events": np.asarray(curve.events, dtype=float).tolist(), "survival": curve.survival.tolist(),
        "ci_low": curve.ci_low.tolist(), "ci_high": curve.ci_high.tolist(),
    }


def _configurations(parts: list[dict[str, Any]]) -> Counter[Configuration]:
    return sum((configurations_from_json(p["configurations"]) for p in parts), start=Counter())


def _cox(name: str, parts: list[dict[str, Any]]) -> tuple[float, float, str]:
    """(log HR, SE, variance label) of one analysis over the given sites' parts."""
    if name == "matched":
        fit = fit_matched_cox(_configurations(parts))
        return fit.log_hr, fit.se, "model-based, conditional on the matched set"
    tables, squares = _tables(parts)
    weighted = name != "crude"
    result = fit_stratified_cox(tables, squares if weighted else None, what=f"the {name} Cox model")
    return result.log_hr, result.se, "robust sandwich (Lin-Wei), weights as fixed" if weighted else "model-based"


def _ph_check(name: str, parts: list[dict[str, Any]], cuts: list[int], log_hr: float) -> dict[str, Any]:
    if name == "matched":
        return ph_check.matched(_configurations(parts), cuts)
    tables, squares = _tables(parts)
    return ph_check.from_tables(tables, squares if name != "crude" else None, log_hr, cuts)


def _describe(name: str, protocol: StudyProtocol) -> str:
    stabilized = "stabilized" if protocol.weighting.stabilized else "not stabilized"
    text = DESCRIPTIONS[name].format(
        ratio=protocol.matching.ratio, caliper=protocol.matching.caliper, stabilized=stabilized
    )
    if name.startswith("iptw") or name == "overlap":
        if protocol.weighting.trim:
            text += f"; rows with a score outside [{protocol.weighting.trim}, {1 - protocol.weighting.trim}] dropped"
        if protocol.weighting.truncate_at:
            text += f"; weights capped at {protocol.weighting.truncate_at}"
    return text


def _header(name: str, protocol: StudyProtocol, log_hr: float, se: float, variance: str) -> dict[str, Any]:
    ratio = wald_ratio(log_hr, se)
    return {
        "weights": _describe(name, protocol),
        "stabilized_weights": protocol.weighting.stabilized if name == "iptw_ate" else False,
        "model": "Cox proportional hazards, Breslow ties, treatment only, "
                 + ("stratified by matched set" if name == "matched" else "stratified by site"),
        "site_stratified": name != "matched",
        "matched_set_stratified": name == "matched",
        "variance": variance,
        "hr": ratio.estimate, "ci_low": ratio.ci_low, "ci_high": ratio.ci_high, "ci_level": ratio.level,
        "log_hr": ratio.log_estimate, "se_log_hr": ratio.se, "p_value": ratio.p_value,
    }


def _counts_block(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total = {key: np.sum([p[key] for p in parts], axis=0).tolist() for key in
             ("n", "events", "person_days", "weight", "weighted_events", "weighted_person_days")}
    block: dict[str, Any] = {}
    for arm, label in _ARMS:
        block[f"n_{label}"] = int(total["n"][arm])
        block[f"events_{label}"] = int(total["events"][arm])
        block[f"person_days_{label}"] = int(total["person_days"][arm])
        block[f"weighted_n_{label}"] = total["weight"][arm]
        block[f"weighted_events_{label}"] = total["weighted_events"][arm]
        block[f"rate_per_1000py_{label}"] = rate_per_1000_person_years(
            total["weighted_events"][arm], total["weighted_person_days"][arm]
        )
    return block


def _survival_block(pooled: EventTable, protocol: StudyProtocol) -> dict[str, Any]:
    """KM per arm, risks at the horizon with their ratio and difference, and the log-rank test."""
    curves = {label: kaplan_meier(pooled, arm) for arm, label in _ARMS}
    horizon = protocol.horizon_days()
    risks = {label: risk_at(curves[label], horizon) for _, label in _ARMS}
    logrank = logrank_test(pooled)
    block: dict[str, Any] = {"horizon_days": horizon}
    for _, label in _ARMS:
        risk = risks[label]
        block[f"risk_{label}"] = risk.risk
        block[f"risk_{label}_ci_low"], block[f"risk_{label}_ci_high"] = risk.ci_low, risk.ci_high
    block.update({
        **contrast_risks(risks["exposed"], risks["comparator"]).to_json(),
        "logrank_p": logrank.p_value, "logrank_statistic": logrank.statistic,
        "km": {label: _curve_json(curves[label]) for _, label in _ARMS},
    })
    return block


_NO_TABLES = (
    "a site's policy keeps event tables at the site: no Kaplan-Meier curves, risks or log-rank test; "
    "the Cox fit ran in extra rounds of derivatives"
)


def analysis_result(
    name: str, parts: list[dict[str, Any]], protocol: StudyProtocol, fit: WeightedCoxFit | None = None
) -> dict[str, Any]:
    """One analysis's estimates over all sites (``parts``: its values from every site).

    With event tables everything is central; without them ``fit`` (the analysis's
    :class:`~coordinator.fits.WeightedCoxFit`, not needed for matching) holds the Cox fit.
    """
    if "table" in parts[0]:
        result = _header(name, protocol, *_cox(name, parts))
        pooled_part = {"table": merge_weighted([p["table"] for p in parts])}
        if name != "matched":  # the same model with one baseline hazard for all sites (WebDISCO's design)
            log_hr_pooled, se_pooled, _ = _cox(name, [pooled_part])
            pooled_ratio = wald_ratio(log_hr_pooled, se_pooled)
            result["pooled_baseline"] = {
                "model": "as above, one baseline hazard for all sites (not stratified)",
                "hr": pooled_ratio.estimate, "ci_low": pooled_ratio.ci_low, "ci_high": pooled_ratio.ci_high,
                "log_hr": pooled_ratio.log_estimate, "se_log_hr": pooled_ratio.se,
            }
        return {**result, **_counts_block(parts), **_survival_block(pooled_part["table"].table, protocol),
                "ph_check": _ph_check(name, parts, protocol.cut_days(), result["log_hr"])}
    if name == "matched":
        result = _header(name, protocol, *_cox(name, parts))
        check = _ph_check(name, parts, protocol.cut_days(), result["log_hr"])
    else:
        assert fit is not None
        assert fit.final is not None
        final = fit.final
        se = np.sqrt(final["meat"]) / final["information"] if fit.robust else np.sqrt(1.0 / final["information"])
        variance = "robust sandwich (Lin-Wei), weights as fixed" if fit.robust else "model-based"
        result = _header(name, protocol, final["log_hr"], float(se), variance)
        result["convergence_check"] = {"rounds": fit.iterations, "max_abs_next_step": final["next_step"]}
        check = ph_check.from_scores(final["windows"], final["window_meat"] if fit.robust else None, protocol.cut_days())
    return {**result, **_counts_block(parts), "km": None, "logrank_p": None, "survival_note": _NO_TABLES,
            "ph_check": check}


def _guarded_result(
    name: str, parts: list[dict[str, Any]], protocol: StudyProtocol, fit: WeightedCoxFit | None = None
) -> dict[str, Any]:
    """The analysis's result, or its counts and the reason it has no estimate (never NaN)."""
    try:
        return analysis_result(name, parts, protocol, fit)
    except ConvergenceError as error:
        counts = {key: np.sum([p[key] for p in parts], axis=0).tolist() for key in ("n", "events")}
        return {
            "weights": _describe(name, protocol), "error": str(error),
            **{f"{key}_{label}": int(counts[key][arm]) for key in ("n", "events") for arm, label in _ARMS},
        }


def balance(
    names: list[str], by_analysis: dict[str, list[dict[str, Any]]], columns: list[str], concepts: list[str] | None = None,
) -> dict[str, Any]:
    """SMD per covariate before (all rows) and after each matching/weighting.

    ``concepts`` are the large-scale concept columns after the named ``columns`` in the
    sites' moments: summarised apart (``large_scale``), never mixed into ``max_abs_smd``.
    """
    concept_smd: dict[str, Any] = {}
    out: dict[str, Any] = {"smd_definition": "(mean_exposed - mean_comparator) / sqrt((var_exposed + "
                           "var_comparator) / 2), weighted variances dividing by the sum of weights",
                           "covariates": {column: {} for column in columns}, "max_abs_smd": {}}
    for name in names:
        label = "before" if name == "crude" else name
        moments = sum((ArmMoments.from_json(p["moments"]) for p in by_analysis[name][1:]),
                      start=ArmMoments.from_json(by_analysis[name][0]["moments"]))
        if not np.all(moments.weight > 0):
            out["max_abs_smd"][label] = None
            for column in columns:
                out["covariates"][column][label] = None
            out.setdefault("notes", {})[label] = "not computed: an arm has no rows after matching/weighting"
            concept_smd[label] = None
            continue
        result = standardized_differences(moments)
        concept_smd[label] = result.smd[len(columns):]
        for i, column in enumerate(columns):
            out["covariates"][column][label] = {
                "mean_exposed": float(result.mean_exposed[i]), "mean_comparator": float(result.mean_comparator[i]),
                "smd": float(result.smd[i]),
            }
        out["max_abs_smd"][label] = float(np.max(np.abs(result.smd[: len(columns)]))) if len(columns) else 0.0
    if concepts:
        out["large_scale"] = concept_balance(concept_smd, concepts)
    return out


def propensity_histogram(partials: Partials) -> dict[str, Any]:
    """Summed per-arm PS histograms (None where a site suppressed a cell) and the c-statistic.

    The c-statistic reported is exact over exposed-comparator pairs within a site (the pairs
    matching can form): the sites' Mann-Whitney counts summed. The c-statistic over all
    pairs, across sites too, is approximated from the histograms when no cell is suppressed.
    """
    edges = partials[0]["histogram"]["edges"]
    summed: dict[str, list[int | None]] = {}
    for label in ("exposed", "comparator"):
        columns = zip(*(p["histogram"][label] for p in partials), strict=True)
        summed[label] = [None if any(c is None for c in column) else int(sum(column)) for column in columns]
    pairs = sum(p["c_statistic"]["pairs"] for p in partials)
    result: dict[str, Any] = {
        "edges": edges, **summed,
        "c_statistic": sum(p["c_statistic"]["concordance"] for p in partials) / pairs if pairs else None,
        "c_statistic_definition": "exact, over exposed-comparator pairs within the same site (ties count 1/2)",
    }
    if any(c is None for label in summed for c in summed[label]):
        result["c_statistic_all_pairs"] = None
        result["c_statistic_all_pairs_note"] = "not computed: a site suppressed small histogram cells"
        return result
    exposed = np.array(summed["exposed"], dtype=float)
    comparator = np.array(summed["comparator"], dtype=float)
    all_pairs = exposed.sum() * comparator.sum()
    below = np.cumsum(comparator) - comparator
    tied = float(np.sum(exposed * comparator))
    result["c_statistic_all_pairs"] = (float(np.sum(exposed * below)) + 0.5 * tied) / all_pairs
    result["c_statistic_all_pairs_max_error"] = 0.5 * tied / all_pairs
    result["c_statistic_all_pairs_note"] = "approximate: from the binned scores; pairs in one bin count 1/2"
    return result


def meta(names: list[str], by_analysis: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Each site's own estimate per analysis and their fixed/random-effects meta-analysis."""
    out: dict[str, Any] = {}
    for name in names:
        sites: list[dict[str, Any]] = []
        excluded: list[dict[str, str]] = []
        for site_id, part in by_analysis[name]:
            if "table" not in part and name != "matched":  # event tables stayed at the site
                if not part.get("local_fit"):
                    excluded.append({"site_id": site_id, "reason": "the site's own Cox model has no estimate"})
                    continue
                log_hr, se = part["local_fit"]["beta"], float(np.sqrt(part["local_fit"]["variance"]))
                sites.append({"site_id": site_id, "log_hr": log_hr, "se_log_hr": se, "hr": float(np.exp(log_hr))})
                continue
            try:
                log_hr, se, _ = _cox(name, [part])
            except ConvergenceError as error:
                excluded.append({"site_id": site_id, "reason": str(error)})
                continue
            sites.append({"site_id": site_id, "log_hr": log_hr, "se_log_hr": se, "hr": float(np.exp(log_hr))})
        entry: dict[str, Any] = {"sites": sites, "excluded": excluded}
        if sites:
            entry.update(meta_analysis([s["log_hr"] for s in sites], [s["se_log_hr"] for s in sites]).to_json())
        out[name] = entry
    return out


def combine(
    protocol: StudyProtocol, partials: Partials, site_ids: list[str], cox_fits: dict[str, WeightedCoxFit] | None = None,
    concepts: list[str] | None = None,
) -> dict[str, Any]:
    """Everything the adjusted round gives: analyses, balance, PS histogram, meta-analysis.

    ``concepts``: the propensity model's large-scale concept columns (their balance too).

    An analysis a site withheld (a count below its minimum cell count) has no pooled
    estimate: it says which sites withheld it, and the other analyses go on.
    """
    names = ["crude", *protocol.adjusted_analyses()]
    by_analysis = {
        name: [{**part, "table": WeightedTable.from_json(part["table"])} if "table" in part else part
               for part in (p["parts"][name] for p in partials)]
        for name in names
    }
    withheld = {
        name: [(site, part["withheld"]) for site, part in zip(site_ids, by_analysis[name], strict=True) if "withheld" in part]
        for name in names
    }
    complete = [name for name in names if not withheld[name]]
    analyses: dict[str, Any] = {}
    for name in names:
        if withheld[name]:
            analyses[name] = {
                "weights": _describe(name, protocol),
                "error": f"withheld by site(s) {[site for site, _ in withheld[name]]}: "
                         + " | ".join(reason for _, reason in withheld[name]),
            }
        else:
            fit = (cox_fits or {}).get(name)
            if fit is not None and fit.error is not None:
                analyses[name] = {"weights": _describe(name, protocol), "error": fit.error}
            else:
                analyses[name] = _guarded_result(name, by_analysis[name], protocol, fit)
    meta_sites = {name: [(site, part) for site, part in zip(site_ids, by_analysis[name], strict=True)
                         if "withheld" not in part] for name in names}
    return {
        "analyses": analyses,
        "balance": balance(complete, by_analysis, protocol.covariate_columns(), concepts),
        "histogram": propensity_histogram(partials),
        "meta": meta(names, meta_sites),
    }
