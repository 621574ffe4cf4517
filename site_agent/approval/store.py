"""The site's approvals and the studies waiting for one, as two JSON files in its workdir.

``<workdir>/approval/approvals.json`` holds every approval ever given (study, hash, who,
when); ``pending.json`` the studies that asked and were refused for lack of one. JSON, not
Delta: a few small records a steward may read by eye, written atomically (temp + rename).
The site service only appends to ``pending.json``; ``fedrwe site approve`` only to
``approvals.json``, so the two never overwrite each other's records.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.errors import SettingsError
from shared.protocol.model import StudyProtocol


class Approval(BaseModel):
    """A steward's approval of one protocol hash."""

    model_config = ConfigDict(frozen=True)

    study_id: str
    sha256: str
    approved_by: str
    approved_at: str


class PendingStudy(BaseModel):
    """A study that asked this site to run and was refused for lack of approval."""

    model_config = ConfigDict(frozen=True)

    study_id: str
    sha256: str
    title: str
    analyses: list[str]
    comparisons: list[str]
    asked_at: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ApprovalStore:
    """Read and write one site's approvals (``folder`` = ``<workdir>/approval``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._approvals = folder / "approvals.json"
        self._pending = folder / "pending.json"

    def _read(self, path: Path, key: str) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        try:
            records = json.loads(path.read_text(encoding="utf-8"))[key]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise SettingsError(
                f"approval file {path} is unreadable ({error}). Fix: restore it from the site's "
                f"backup; approvals are never edited by hand."
            ) from None
        return list(records)

    def _write(self, path: Path, key: str, records: list[dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({key: records}, out, indent=2)
            out.write("\n")
        os.replace(temp, path)

    def approvals(self) -> list[Approval]:
        """Every approval given at this site, oldest first."""
        return [Approval.model_validate(r) for r in self._read(self._approvals, "approvals")]

    def approval_for(self, study_id: str, sha256: str) -> Approval | None:
        """The approval of exactly this study and protocol hash, if any."""
        for approval in self.approvals():
            if approval.study_id == study_id and approval.sha256 == sha256:
                return approval
        return None

    def pending(self) -> list[PendingStudy]:
        """Studies refused for lack of approval whose hash is still not approved, latest ask first."""
        approved = {(a.study_id, a.sha256) for a in self.approvals()}
        records = [PendingStudy.model_validate(r) for r in self._read(self._pending, "pending")]
        waiting = [p for p in records if (p.study_id, p.sha256) not in approved]
        return sorted(waiting, key=lambda p: p.asked_at, reverse=True)

    def record_pending(self, protocol: StudyProtocol) -> None:
        """Note that ``protocol`` asked to run without an approval (one record per hash)."""
        records = self._read(self._pending, "pending")
        sha = protocol.sha256()
        records = [r for r in records if (r.get("study_id"), r.get("sha256")) != (protocol.study_id, sha)]
        records.append(PendingStudy(
            study_id=protocol.study_id, sha256=sha, title=protocol.title,
            analyses=[str(a) for a in protocol.analyses],
            comparisons=[c for c in protocol.comparison_ids() if c is not None],
            asked_at=_now(),
        ).model_dump())
        self._write(self._pending, "pending", records)

    def approve(self, study_id: str, sha256: str | None, by: str) -> Approval:
        """Approve a study's protocol: the hash given, or else the one pending for the study."""
        if sha256 is None:
            asked = {p.sha256 for p in self.pending() if p.study_id == study_id}
            if len(asked) != 1:
                found = "none" if not asked else ", ".join(sorted(asked))
                raise SettingsError(
                    f"study {study_id!r} has {found} pending protocol hash(es) at {self._pending}. Fix: "
                    f"list them with `fedrwe site pending` and pass the one to approve with --sha256."
                )
            sha256 = asked.pop()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise SettingsError(
                f"--sha256 {sha256!r} is not a protocol hash (64 lowercase hex digits). Fix: copy it "
                f"from `fedrwe site pending` or `fedrwe protocol check`."
            )
        existing = self.approval_for(study_id, sha256)
        if existing is not None:
            return existing
        approval = Approval(study_id=study_id, sha256=sha256, approved_by=by, approved_at=_now())
        self._write(self._approvals, "approvals", [*self._read(self._approvals, "approvals"), approval.model_dump()])
        return approval


def approval_store(workdir: Path) -> ApprovalStore:
    """The approval store of the site whose workdir is ``workdir``."""
    return ApprovalStore(workdir / "approval")
