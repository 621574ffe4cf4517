"""The ingest and its data-quality report as rich tables that fit an 80-column terminal."""

from __future__ import annotations

from rich import box
from rich.table import Table

from site_agent.ingest.load import IngestResult
from site_agent.ingest.report import Report


def tables_table(result: IngestResult) -> Table:
    """One line per table: source file, rows, Delta version, written or unchanged, mapping."""
    table = Table(title=f"{result.site_id}: OMOP CDM {result.cdm_version} -> {result.lake}",
                  box=box.SIMPLE_HEAD)
    table.add_column("table / file", overflow="fold")
    table.add_column("rows", justify="right")
    table.add_column("version", justify="right")
    table.add_column("Delta")
    table.add_column("5.4 mapping", overflow="fold")
    for t in result.tables:
        notes = [f"{len(t.renamed)} renamed"] if t.renamed else []
        notes += [f"{len(t.added)} added empty"] if t.added else []
        notes += [f"{len(t.dropped)} dropped"] if t.dropped else []
        table.add_row(f"{t.table}\n[dim]{t.source}[/]", f"{t.rows:,}", str(t.version),
                      "written" if t.changed else "unchanged", ", ".join(notes))
    return table


def findings_table(report: Report) -> Table:
    """One line per finding, errors first, with its count and an example row id."""
    table = Table(title=f"data quality: {len(report.errors)} error(s), {len(report.warnings)} "
                        f"warning(s)", box=box.SIMPLE_HEAD)
    table.add_column("severity / check")
    table.add_column("table / column", overflow="fold")
    table.add_column("rows", justify="right")
    table.add_column("example id", overflow="fold")
    for f in report.findings:
        style = "bold red" if f.severity == "error" else "yellow"
        table.add_row(f"[{style}]{f.severity}[/]\n{f.check}", f"{f.table}\n[dim]{f.column}[/]",
                      f"{f.count:,}", f.example_id or "")
    return table
