"""The audit log's Delta table: one row per entry, one Delta commit per append (delta-rs).

Only the storage lives here (site_agent/data owns every deltalake import); the hash chain
and its verification are in site_agent/audit/delta_log.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake

AUDIT_SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("time", pa.string(), nullable=False),
    pa.field("site_id", pa.string()),
    pa.field("study_id", pa.string()),
    pa.field("round_name", pa.string()),
    pa.field("request_sha256", pa.string()),
    pa.field("decision", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("reply_sha256", pa.string()),
    pa.field("released_sha256", pa.string()),
    pa.field("withheld", pa.string()),
    pa.field("suppressed", pa.string()),
    pa.field("extra", pa.string()),
    pa.field("prev", pa.string(), nullable=False),
    pa.field("hash", pa.string(), nullable=False),
])
SEQ_KEY = "fedrwe.audit.seq"
HASH_KEY = "fedrwe.audit.hash"
_KEEP_EVERY_COMMIT = {"delta.enableExpiredLogCleanup": "false"}  # verification reads every commit file


class AuditTable:
    """Appends audit rows to the Delta table at ``path`` and reads them back with their commits."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(str(self.path))

    def append(self, row: dict[str, Any]) -> int:
        """One row as one Delta commit, its seq and hash in the commit's metadata; the new version."""
        write_deltalake(
            str(self.path), pa.Table.from_pylist([row], schema=AUDIT_SCHEMA), mode="append",
            commit_properties=CommitProperties(custom_metadata={SEQ_KEY: str(row["seq"]), HASH_KEY: row["hash"]}),
            configuration=None if self.exists() else _KEEP_EVERY_COMMIT,
        )
        return DeltaTable(str(self.path)).version()

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the current snapshot, in seq order."""
        rows: list[dict[str, Any]] = DeltaTable(str(self.path)).to_pyarrow_table().to_pylist()
        return sorted(rows, key=lambda row: int(row["seq"]))

    def commits(self) -> list[dict[str, Any]]:
        """Every commit in the table's log (version, operation, custom metadata), oldest first."""
        history = DeltaTable(str(self.path)).history()
        return sorted((dict(entry) for entry in history), key=lambda entry: int(entry["version"]))

    def commit_row(self, version: int) -> dict[str, Any]:
        """The row that commit ``version`` added, read from the data file its log entry names.

        Raises OSError/ValueError/KeyError when the commit or its data file is gone or damaged.
        """
        log_file = self.path / "_delta_log" / f"{version:020d}.json"
        actions = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        added = [action["add"]["path"] for action in actions if "add" in action]
        if len(added) != 1 or any("remove" in action for action in actions):
            raise ValueError(f"commit {version} adds {len(added)} files and removes some: not one audit append")
        rows: list[dict[str, Any]] = pq.read_table(self.path / unquote(added[0])).to_pylist()
        if len(rows) != 1:
            raise ValueError(f"commit {version}'s data file holds {len(rows)} rows, not one")
        return rows[0]

    def commit_files(self) -> list[int]:
        """Versions whose commit file is present in ``_delta_log``."""
        return sorted(int(p.stem) for p in (self.path / "_delta_log").glob("*.json") if p.stem.isdigit())
