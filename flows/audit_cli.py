"""``fedrwe site audit``: check and read the site's audit log (site_agent/audit/delta_log.py).

    fedrwe site audit verify --config site.toml
    fedrwe site audit show --config site.toml [--last 20]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.errors import DataError

audit_app = typer.Typer(no_args_is_help=True, help="The site's audit log (one entry per request).")
_SHOWN = ("seq", "time", "study_id", "round_name", "decision", "request_sha256", "released_sha256", "suppressed", "reason")


def _folder(config: Path) -> Path:
    from site_agent.settings import load_site_settings

    return load_site_settings(config).workdir / "audit"


@audit_app.command("verify")
def audit_verify(config: Annotated[Path, typer.Option(help="The site's settings (TOML).")]) -> None:
    """Check the hash chain, the Delta commits and the head; name the first bad entry."""
    from site_agent.audit.delta_log import verify

    folder = _folder(config)
    result = verify(folder)
    if not result.ok:
        raise DataError(
            f"audit log {folder} is broken at entry {result.first_bad}: {result.reason}. Fix: keep the "
            f"log as evidence and restore the audit folder from the site's backup."
        )
    Console().print(f"audit log {folder}: {result.entries} entries, chain intact")


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    text = str(value)
    return text[:12] if column.endswith("sha256") else text


@audit_app.command("show")
def audit_show(
    config: Annotated[Path, typer.Option(help="The site's settings (TOML).")],
    last: Annotated[int, typer.Option(min=1, help="How many of the newest entries to show.")] = 20,
) -> None:
    """Print the newest entries of the audit log as a table."""
    from site_agent.audit.delta_log import DeltaAuditLog

    rows = DeltaAuditLog(_folder(config)).last(last)
    table = Table(title=f"audit log: last {len(rows)} entries")
    for column in _SHOWN:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row, column) for column in _SHOWN))
    Console(width=200).print(table)
