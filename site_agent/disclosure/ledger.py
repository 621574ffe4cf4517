"""The site's request ledger: how many rounds each study asked and when each study started.

Kept in the site's workdir (JSON, rewritten atomically) so limits hold across restarts.
``max_rounds_per_study`` bounds the distinct requests one study comparison gets over all
its runs (a retried request is answered from the reply cache and not counted again): each
round evaluates a model at a point the requester chooses, so unbounded rounds let a requester
solve for the data. ``max_studies_per_period`` bounds how many new study comparisons start
within ``period_days``.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared.errors import DisclosureRefused
from site_agent.settings import DisclosurePolicy


class RequestLedger:
    """Counts each study's requests and the studies started per period, at one site."""

    def __init__(self, path: Path, site_id: str) -> None:
        self._path = path
        self._site_id = site_id
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _load(self) -> dict[str, Any]:
        if not self._path.exists():
            return {"studies": {}}
        data: dict[str, Any] = json.loads(self._path.read_text(encoding="utf-8"))
        return data

    def _save(self, data: dict[str, Any]) -> None:
        partial = self._path.with_suffix(".partial")
        partial.write_text(json.dumps(data, sort_keys=True, indent=1), encoding="utf-8")
        partial.replace(self._path)

    def admit(self, study_key: str, request_sha256: str, policy: DisclosurePolicy, now: datetime | None = None) -> None:
        """Count one request of ``study_key``, or refuse it when a limit of the policy is reached."""
        now = now or datetime.now(UTC)
        with self._lock:
            data = self._load()
            studies: dict[str, dict[str, Any]] = data["studies"]
            study = studies.get(study_key)
            if study is None:
                since = now - timedelta(days=policy.period_days)
                recent = [s for s in studies.values() if datetime.fromisoformat(s["first_seen"]) >= since]
                if len(recent) >= policy.max_studies_per_period:
                    raise DisclosureRefused(
                        f"site {self._site_id!r} refused study {study_key!r}: {len(recent)} studies started at "
                        f"this site in the last {policy.period_days} days, the site's max_studies_per_period "
                        f"{policy.max_studies_per_period}. Fix: wait, or ask the site's data steward."
                    )
                study = {"first_seen": now.isoformat(), "requests": []}
                studies[study_key] = study
            if request_sha256 not in study["requests"]:
                if len(study["requests"]) >= policy.max_rounds_per_study:
                    raise DisclosureRefused(
                        f"site {self._site_id!r} refused study {study_key!r}: it has had the site's "
                        f"max_rounds_per_study {policy.max_rounds_per_study} requests. Fix: ask the site's "
                        f"data steward to raise the limit for this study."
                    )
                study["requests"].append(request_sha256)
            self._save(data)
