"""The study's estimates as a terminal table (rich), for `fedrwe simulate` and `fedrwe study run`."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from coordinator.results import comparison_views


def analyses_table(results: dict[str, Any], truth_hr: float | None = None) -> Table:
    """One row per analysis: counts, events, risks, HR with CI (and the planted HR in simulation)."""
    title = "estimates (exposed vs comparator)"
    if truth_hr is not None:
        title += f"; planted conditional HR {truth_hr:.2f}"
    table = Table(title=title, caption="exposed, comparator: persons (events); risks by the horizon day; "
                                       "none*: no estimate, reason in results.json",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("analysis", "exposed", "comparator", "risk exp", "risk comp", "HR", "95% CI"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    table.columns[0].min_width = max(len(name) for name in results["analyses"])
    for name, a in results["analyses"].items():
        arms = [
            f"{a[f'n_{arm}']:,} ({a[f'events_{arm}']:,})" if isinstance(a.get(f"n_{arm}"), int) else "-"
            for arm in ("exposed", "comparator")
        ]
        risks = [f"{a[k]:.3f}" if isinstance(a.get(k), float) else "-" for k in ("risk_exposed", "risk_comparator")]
        if "error" in a:
            table.add_row(name, *arms, *risks, "-", "none*")
        else:
            table.add_row(name, *arms, *risks, f"{a['hr']:.2f}", f"{a['ci_low']:.2f}-{a['ci_high']:.2f}")
    return table


def print_estimates(console: Console, results: dict[str, Any], truth_hr: float | None = None) -> None:
    """The estimates table of every comparison (the planted HR only for a one-comparison study,
    whose arms are the simulation's)."""
    views = comparison_views(results)
    for view in views:
        if view["comparison_id"] is not None:
            console.print(f"[bold]comparison {view['comparison_id']}[/]: {view['title']}")
        if "error" in view:
            console.print(f"  no results: {view['error']}")
        else:
            console.print(analyses_table(view, truth_hr if len(views) == 1 else None))
