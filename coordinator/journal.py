"""The study run's journal: every completed round, on disk, so a crashed coordinator resumes.

Layout (in the study's output folder, next to results.json)::

    journal/run.json        study id, protocol hash, run id, status (running | complete |
                            failed: the study itself failed, e.g. a broken quorum)
    journal/run_config.json the run config the run was submitted with (protocol text, key
                            paths, options; never key material): what a resume resubmits
    journal/0001.json ...   one completed exchange each: the request's SHA-256 and the
                            round's outcome (every site's verified reply, the unreachable
                            sites, timing and bytes)

A round is journaled after its replies were verified and before the coordinator computes
with them, each file written to a temporary name, flushed and renamed, so a crash leaves
either the whole round or nothing. ``fedrwe study resume`` replays the journal: the plan
is rebuilt from the protocol and the run id, each journaled round's request is rebuilt,
checked against the journaled hash (a different request means a different protocol,
software or data: refused), and answered from the journal; the first round not in it goes
to the sites. The plan is a deterministic function of the replies, so a resumed run ends
in the same results as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import SettingsError

JOURNAL_DIR = "journal"


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def unfinished_run(out_dir: Path, study_id: str) -> dict[str, Any]:
    """The journal header (run.json) of the unfinished run of ``study_id`` in ``out_dir``.

    Raises:
        SettingsError: no run there, another study's run, or a complete one.
    """
    head = out_dir / JOURNAL_DIR / "run.json"
    if not head.exists():
        raise SettingsError(
            f"no study run to resume in {out_dir} (no {JOURNAL_DIR}/run.json). Fix: pass the --out "
            f"folder of the interrupted run, or start the study with `fedrwe study run`."
        )
    header = dict(json.loads(head.read_text(encoding="utf-8")))
    if header.get("study_id") != study_id:
        raise SettingsError(
            f"{out_dir} holds a run of study {header.get('study_id')!r}, not {study_id!r}. Fix: pass "
            f"{header.get('study_id')!r}, or the --out folder of study {study_id!r}."
        )
    if header.get("status") == "complete":
        raise SettingsError(
            f"the run {header.get('run_id')} in {out_dir} is complete (its results.json is written); "
            f"there is nothing to resume. Fix: read {out_dir / 'results.json'}, or start a new run."
        )
    return header


class RoundJournal:
    """Append completed rounds; hand them back, in order, when a run resumes."""

    def __init__(self, folder: Path, header: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.header = header
        self._entries = entries
        self._next = 0  # index of the next journaled round to replay
        self._replayed = 0

    @property
    def run_id(self) -> str:
        """The run id every request of this run carries."""
        return str(self.header["run_id"])

    @property
    def replayed(self) -> int:
        """How many journaled rounds were handed back so far."""
        return self._replayed

    @classmethod
    def start(
        cls, out_dir: Path, study_id: str, protocol_sha256: str, run_id: str,
        run_config: dict[str, Any] | None = None,
    ) -> RoundJournal:
        """A new journal for a new run; an unfinished run's journal is never overwritten.

        Raises:
            SettingsError: ``out_dir`` holds an unfinished run (names it and the resume command).
        """
        folder = out_dir / JOURNAL_DIR
        if (folder / "run.json").exists():
            old = json.loads((folder / "run.json").read_text(encoding="utf-8"))
            if old.get("status") == "running":  # crashed: only a resume may continue it
                rounds = len(list(folder.glob("[0-9]*.json")))
                raise SettingsError(
                    f"{out_dir} holds an unfinished run of study {old.get('study_id')!r} (run "
                    f"{old.get('run_id')}, {rounds} round(s) journaled); a new run would lose it. Fix: "
                    f"`fedrwe study resume {old.get('study_id')} --out {out_dir} ...` to finish it, or "
                    f"choose another --out folder."
                )
        if folder.exists():
            shutil.rmtree(folder)  # a complete or failed run's journal: a new run replaces it
        folder.mkdir(parents=True)
        header = {
            "study_id": study_id, "protocol_sha256": protocol_sha256, "run_id": run_id,
            "status": "running", "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_atomic(folder / "run.json", header)
        if run_config is not None:
            _write_atomic(folder / "run_config.json", run_config)
        return cls(folder, header, [])

    @classmethod
    def resume(cls, out_dir: Path, study_id: str, protocol_sha256: str) -> RoundJournal:
        """The journal of the unfinished run in ``out_dir``, to replay.

        Raises:
            SettingsError: no journal, another study or protocol, or an already complete run.
        """
        folder = out_dir / JOURNAL_DIR
        header = unfinished_run(out_dir, study_id)
        if header.get("protocol_sha256") != protocol_sha256:
            raise SettingsError(
                f"the journal in {folder} was written for protocol {header.get('protocol_sha256')}, and the "
                f"protocol given hashes to {protocol_sha256}; a resumed run must ask the same questions. Fix: "
                f"resume with the original protocol, or start a new run in another --out folder."
            )
        paths = sorted(folder.glob("[0-9]*.json"))
        entries = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
        for number, entry in enumerate(entries, start=1):
            if entry.get("index") != number:
                raise SettingsError(
                    f"journal {folder} lacks round {number} (found {[p.name for p in paths]}); it was "
                    f"edited. Fix: start a new run in another --out folder."
                )
        return cls(folder, header, entries)

    def replay(self, round_name: str, request_bytes: bytes) -> dict[str, Any] | None:
        """The journaled outcome of this request, or None once the journal is exhausted.

        Raises:
            SettingsError: the rebuilt request differs from the journaled one.
        """
        if self._next >= len(self._entries):
            return None
        entry = self._entries[self._next]
        digest = hashlib.sha256(request_bytes).hexdigest()
        if entry["round_name"] != round_name or entry["request_sha256"] != digest:
            raise SettingsError(
                f"resuming run {self.run_id}: round {self._next + 1} is now {round_name!r} (request sha256 "
                f"{digest[:12]}) but the journal holds {entry['round_name']!r} ({entry['request_sha256'][:12]}): "
                f"the coordinator's software or the protocol changed since the run started. Fix: resume "
                f"with the same fedrwe version, or start a new run in another --out folder."
            )
        self._next += 1
        self._replayed += 1
        return dict(entry["outcome"])

    def record(self, round_name: str, request_bytes: bytes, outcome: dict[str, Any]) -> None:
        """Append one completed round (atomically)."""
        index = len(self._entries) + 1
        entry = {
            "index": index, "round_name": round_name,
            "request_sha256": hashlib.sha256(request_bytes).hexdigest(), "outcome": outcome,
        }
        _write_atomic(self.folder / f"{index:04d}.json", entry)
        self._entries.append(entry)
        self._next = len(self._entries)

    def fail(self, reason: str) -> None:
        """Mark the run failed (the study failed, the coordinator did not crash): a new run may
        replace it, and a resume may retry it (for a failure that has since been fixed)."""
        self.header = {**self.header, "status": "failed", "error": reason}
        _write_atomic(self.folder / "run.json", self.header)

    def complete(self) -> None:
        """Mark the run complete (its results.json and report are written)."""
        self.header = {**self.header, "status": "complete"}
        _write_atomic(self.folder / "run.json", self.header)
