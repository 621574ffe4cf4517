"""The data-quality report of a site's OMOP tables: findings, JSON, and the blocking error.

A finding is an ``error`` when a study on these tables would be wrong or impossible (it
blocks every study until fixed) and a ``warning`` when the cohort rules cope (the rows are
ignored or kept as they are) but the data steward should know. The list of checks and
their severities is in docs/ingest.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from shared.errors import DataQualityError

Severity = Literal["error", "warning"]
REPORT_FOLDER = "_fedrwe"
REPORT_FILE = "data_quality.json"


@dataclass(frozen=True)
class Finding:
    """One check that found something: where, how many rows, one example row id.

    The example id is text: 64-bit ids would lose digits in JSON readers that use doubles.
    """

    check: str
    severity: Severity
    table: str
    column: str
    count: int
    example_id: str | None
    message: str


@dataclass(frozen=True)
class TableRows:
    """A table as checked: its row count and Delta version."""

    rows: int
    version: int


@dataclass(frozen=True)
class Report:
    """Everything the checks found in one site's lake on one day."""

    site_id: str
    lake: str
    checked_on: str
    tables: dict[str, TableRows]
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    def as_dict(self) -> dict[str, object]:
        return {
            "site_id": self.site_id,
            "lake": self.lake,
            "checked_on": self.checked_on,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "tables": {name: asdict(rows) for name, rows in self.tables.items()},
            "findings": [asdict(finding) for finding in self.findings],
        }

    def to_json(self) -> str:
        """The report as JSON; plain numbers only (NaN or infinity would raise)."""
        return json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n"

    def raise_for_errors(self, written_to: Path | None = None) -> None:
        """Raise ``DataQualityError`` naming every blocking finding; do nothing without one.

        ``written_to`` is where the report was saved (default: next to the tables).
        """
        if not self.errors:
            return
        path = written_to or report_path(Path(self.lake))
        listed = "; ".join(
            f"{f.table}{'.' + f.column if f.column else ''} [{f.check}]: {f.message.rstrip('.')}"
            for f in self.errors[:10]
        )
        more = f"; and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
        raise DataQualityError(
            f"site {self.site_id!r}: the OMOP tables in {self.lake} fail {len(self.errors)} "
            f"data-quality check(s) that block a study: {listed}{more}. The full report "
            f"(warnings too) is {path}.",
            report_path=str(path),
        )


def report_path(lake: Path) -> Path:
    """Where the report of the tables in ``lake`` is written."""
    return lake / REPORT_FOLDER / REPORT_FILE


def write_report(report: Report) -> Path:
    """Write the report as JSON next to the tables; returns its path."""
    path = report_path(Path(report.lake))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json(), encoding="utf-8")
    return path
