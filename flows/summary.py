"""The study's estimates as a terminal table (rich), for `fedrwe simulate` and `fedrwe study run`."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _ci(estimate: float | None, low: float | None, high: float | None) -> str:
    return "-" if estimate is None or low is None or high is None else f"{estimate:.2f} ({low:.2f}-{high:.2f})"


def analyses_table(results: dict[str, Any], truth_hr: float | None = None) -> Table:
    """One row per analysis: counts, events, risks, HR with CI (and the planted HR in simulation)."""
    title = "estimates (exposed vs comparator)"
    if truth_hr is not None:
        title += f"; planted conditional HR {truth_hr:.2f}"
    table = Table(title=title)
    for column in ("analysis", "n exp.", "n comp.", "events exp.", "events comp.", "risk exp.", "risk comp.",
                   "HR (95% CI)"):
        table.add_column(column, justify="right")
    for name, a in results["analyses"].items():
        counts = [f"{a[k]:,}" if isinstance(a.get(k), int) else "-" for k in
                  ("n_exposed", "n_comparator", "events_exposed", "events_comparator")]
        risks = [f"{a[k]:.3f}" if isinstance(a.get(k), float) else "-" for k in ("risk_exposed", "risk_comparator")]
        estimate = "no estimate (see results.json)" if "error" in a else _ci(a["hr"], a["ci_low"], a["ci_high"])
        table.add_row(name, *counts, *risks, estimate)
    return table
