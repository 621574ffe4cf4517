"""The site's append-only, hash-chained release log (JSON lines).

Each entry carries the SHA-256 of the previous one, so an edited or deleted entry breaks
the chain; :func:`verify_chain` finds the first break.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_GENESIS = "0" * 64


def _digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    """Appends one entry per request: what was asked, what was decided, what left."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _last_hash(self) -> str:
        if not self._path.exists():
            return _GENESIS
        last = ""
        with self._path.open(encoding="utf-8") as lines:
            for line in lines:
                last = line
        return json.loads(last)["hash"] if last.strip() else _GENESIS

    def append(self, **fields: Any) -> None:
        with self._lock:
            entry = {"time": datetime.now(UTC).isoformat(), **fields, "prev": self._last_hash()}
            entry["hash"] = _digest(entry)
            with self._path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry, sort_keys=True) + "\n")


def verify_chain(path: Path) -> int | None:
    """Line number (1-based) of the first broken entry, or None when the chain is intact."""
    previous = _GENESIS
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            entry = json.loads(line)
            claimed = entry.pop("hash")
            if entry.get("prev") != previous or _digest(entry) != claimed:
                return number
            previous = claimed
    return None
