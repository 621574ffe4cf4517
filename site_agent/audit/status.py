"""What a steward asks of the site: what ran, what waits for approval, what was released.

Read from the site's hash-chained audit log (site_agent/audit/delta_log.py) and its
approval store (site_agent/approval); nothing is written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from site_agent.approval import approval_store
from site_agent.data.audit_table import AuditTable

RELEASE_DECISIONS = ("released", "released with parts withheld", "suppressed")


def _kind(decision: str) -> str:
    """The decision's family: released, withheld, suppressed, refused, error or replayed."""
    if decision == "released with parts withheld":
        return "withheld"
    return decision.split(":", 1)[0]


def site_status(workdir: Path) -> dict[str, Any]:
    """Per study: rounds asked, decisions by kind, last time; pending approvals; approvals given."""
    folder = workdir / "audit"
    table = AuditTable(folder / "releases")
    rows = table.rows() if table.exists() else []
    studies: dict[str, dict[str, Any]] = {}
    for row in rows:
        study = studies.setdefault(str(row.get("study_id") or "(no study)"), {
            "rounds": [], "decisions": Counter(), "first": row["time"], "last": row["time"],
        })
        if row.get("round_name") and row["round_name"] not in study["rounds"]:
            study["rounds"].append(row["round_name"])
        study["decisions"][_kind(str(row["decision"]))] += 1
        study["last"] = row["time"]
    store = approval_store(workdir)
    return {
        "audit_log": str(folder), "entries": len(rows), "last_entry": rows[-1]["time"] if rows else None,
        "studies": {
            sid: {**s, "decisions": dict(sorted(s["decisions"].items()))} for sid, s in sorted(studies.items())
        },
        "pending": [p.model_dump() for p in store.pending()],
        "approvals": [a.model_dump() for a in store.approvals()],
    }
