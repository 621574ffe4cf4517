"""The site's audit log in Delta: append-only, hash-chained, one row (and commit) per request.

Each row holds the time, site, study, round, the request's SHA-256, the decision
(released / released with parts withheld / suppressed / refused / error / replayed) and why,
the SHA-256 of the reply and of what was released, and the withheld and suppressed names
(with the withheld small values, which only the site can read). Each row carries the hash
of the previous one; each Delta commit carries its row's seq and hash; ``head.json`` next
to the table holds the last seq and hash. :func:`verify` therefore names the first bad
entry when a row is edited, deleted or reordered, a commit file or data file is deleted,
a foreign commit (update, delete, optimize) was made, or the newest entries were cut off.
Someone who can rewrite every file at once can forge a consistent log: anchor the head
hash elsewhere (e.g. print it into the steward's records) for that.

The JSON-lines log (site_agent/audit/log.py) is written alongside as a readable mirror.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from site_agent.audit.log import AuditLog, verify_chain
from site_agent.data.audit_table import HASH_KEY, SEQ_KEY, AuditTable

GENESIS = "0" * 64
_COLUMNS = ("site_id", "study_id", "round_name", "request_sha256", "decision", "reason", "reply_sha256", "released_sha256")
_JSON_COLUMNS = ("withheld", "suppressed")


def entry_hash(row: dict[str, Any]) -> str:
    """SHA-256 of the row's canonical JSON without its own hash."""
    body = {key: value for key, value in row.items() if key != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _row(seq: int, prev: str, fields: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"seq": seq, "time": datetime.now(UTC).isoformat(), "prev": prev}
    for column in _COLUMNS:
        value = fields.pop(column, None)
        row[column] = None if value is None else str(value)
    for column in _JSON_COLUMNS:
        value = fields.pop(column, None)
        row[column] = json.dumps(value, sort_keys=True) if value else None
    row["extra"] = json.dumps(fields, sort_keys=True, default=str) if fields else None
    row["hash"] = entry_hash(row)
    return row


class DeltaAuditLog:
    """Appends one hash-chained row per request to ``folder/releases`` (Delta), mirrored to JSON lines."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.table = AuditTable(folder / "releases")
        self.head_path = folder / "head.json"
        self.mirror = AuditLog(folder / "releases.jsonl")
        self._lock = threading.Lock()
        self._head: tuple[int, str] | None = None

    def _last(self) -> tuple[int, str]:
        if self._head is None:
            if self.head_path.exists():
                head = json.loads(self.head_path.read_text(encoding="utf-8"))
                self._head = int(head["seq"]), str(head["hash"])
            else:
                self._head = -1, GENESIS
        return self._head

    def append(self, **fields: Any) -> None:
        """One entry: the keyword fields of the decision (unknown ones kept in ``extra``)."""
        with self._lock:
            self.mirror.append(**fields)
            seq, prev = self._last()
            row = _row(seq + 1, prev, dict(fields))
            self.table.append(row)
            self._head = row["seq"], row["hash"]
            partial = self.head_path.with_suffix(".partial")
            partial.write_text(json.dumps({"seq": row["seq"], "hash": row["hash"]}), encoding="utf-8")
            partial.replace(self.head_path)

    def last(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` entries, oldest first."""
        return self.table.rows()[-n:] if self.table.exists() else []


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`: entries checked, and the first bad one with why."""

    entries: int
    first_bad: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def _commits_problem(table: AuditTable) -> Verification | None:
    """A missing commit file, an unreadable log, or a commit that is not an audit append."""
    files = table.commit_files()
    for expected, version in enumerate(files):
        if version != expected:
            return Verification(len(files), expected, f"Delta commit {expected} (entry {expected}) was deleted")
    try:
        commits = table.commits()
    except Exception as error:  # delta-rs raises its own errors for a broken log
        return Verification(len(files), 0, f"the Delta log cannot be read: {error}")
    for commit in commits:
        version = int(commit["version"])
        if commit.get("operation") != "WRITE" or commit.get(SEQ_KEY) != str(version):
            return Verification(len(commits), version, (
                f"Delta commit {version} is not an audit append (operation {commit.get('operation')}): "
                f"the table was changed outside the audit log"
            ))
    return None


def _entries_problem(table: AuditTable, versions: int, hashes: dict[int, str]) -> Verification | None:
    """Read entry by entry from its own commit: the first one missing, moved or edited."""
    previous = GENESIS
    for version in range(versions):
        try:
            row = table.commit_row(version)
        except (OSError, ValueError, KeyError) as error:
            return Verification(versions, version, f"entry {version} cannot be read from its commit: {error}")
        if int(row["seq"]) != version:
            return Verification(versions, version, f"commit {version} holds entry {row['seq']} (entries were reordered)")
        if row["prev"] != previous:
            return Verification(versions, version, f"entry {version} does not follow entry {version - 1} (reordered or replaced)")
        if entry_hash(row) != row["hash"] or hashes.get(version) != row["hash"]:
            return Verification(versions, version, f"entry {version} was edited (its hash does not match)")
        previous = row["hash"]
    return None


def verify(folder: Path) -> Verification:
    """Check the Delta audit log under ``folder``: commits, chain, snapshot, head and mirror."""
    table = AuditTable(folder / "releases")
    head_path = folder / "head.json"
    if not table.exists():
        if head_path.exists():
            return Verification(0, 0, "the audit table is gone but its head says entries were written")
        return Verification(0)
    problem = _commits_problem(table)
    if problem is not None:
        return problem
    commits = table.commits()
    hashes = {int(c["version"]): str(c.get(HASH_KEY)) for c in commits}
    problem = _entries_problem(table, len(commits), hashes)
    if problem is not None:
        return problem
    count = len(commits)
    head = json.loads(head_path.read_text(encoding="utf-8")) if head_path.exists() else None
    if head is None or int(head["seq"]) != count - 1 or head["hash"] != hashes[count - 1]:
        first = count if head is None else min(int(head["seq"]), count)
        return Verification(count, first, f"the newest entries were removed (head.json says {head})")
    mirror = folder / "releases.jsonl"
    if mirror.exists() and (line := verify_chain(mirror)) is not None:
        return Verification(count, line - 1, f"the JSON-lines mirror is broken at its line {line}")
    return Verification(count)
