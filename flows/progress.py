"""A study run's progress, read from its journal (coordinator/journal.py), as a rich table.

The ServerApp journals every completed round atomically in ``OUT/journal/NNNN.json``, so
whoever can read ``OUT`` sees how far the run is: ``fedrwe study run`` and ``fedrwe
simulate`` redraw the table while the run is followed (:class:`JournalProgress`), and
``fedrwe study status`` prints it once (:func:`study_status`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.journal import JOURNAL_DIR

_STYLES = {"ok": "green", "unreachable": "yellow", "refused": "red", "error": "red"}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None  # not there, or (never with the journal's atomic writes) unreadable


def journal_rounds(out: Path) -> list[dict[str, Any]]:
    """One row per journaled round: index, name, status per site, seconds, bytes."""
    rounds = []
    for path in sorted((out / JOURNAL_DIR).glob("[0-9]*.json")):
        entry = _read_json(path)
        if entry is None:
            continue
        outcome = entry.get("outcome", {})
        record = outcome.get("record", {})
        sites = {site: str(reply.get("status", "?")) for site, reply in outcome.get("replies", {}).items()}
        sites |= dict.fromkeys(outcome.get("unreachable", {}), "unreachable")
        rounds.append({
            "index": entry.get("index"), "name": entry.get("round_name", record.get("name", "?")),
            "sites": dict(sorted(sites.items())), "seconds": record.get("seconds"),
            "bytes": int(record.get("bytes_sent", 0)) + int(record.get("bytes_received", 0)),
        })
    return rounds


def study_status(out: Path) -> dict[str, Any]:
    """What ``OUT`` says about its study run: state, rounds, per-site status, dropped sites.

    ``state`` is ``none`` (no run), ``running`` (journal open; or interrupted), ``complete``
    or ``failed`` (error.txt written by the ServerApp).
    """
    head = _read_json(out / JOURNAL_DIR / "run.json")
    results = _read_json(out / "results.json")
    failure = out / "error.txt"
    rounds = journal_rounds(out)
    state = "none" if head is None else str(head.get("status", "running"))
    if state == "running" and failure.exists():
        state = "failed"
    last: dict[str, str] = {}
    for round_ in rounds:
        last |= round_["sites"]
    status: dict[str, Any] = {
        "out": str(out), "state": state, "study_id": (head or results or {}).get("study_id"),
        "run_id": (head or results or {}).get("run_id"), "started_at": (head or {}).get("started_at"),
        "rounds_done": len(rounds), "rounds": rounds, "sites": last,
        "dropped": sorted(site for site, s in last.items() if s != "ok"),
    }
    if failure.exists():
        status["error"] = failure.read_text(encoding="utf-8").strip()
    if results is not None:
        status["results"] = str(out / "results.json")
        status["prefect_flow_run_id"] = results.get("orchestration", {}).get("prefect_flow_run_id")
    return status


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def rounds_table(rounds: list[dict[str, Any]], title: str = "rounds") -> Table:
    """One row per round, a column per site (ok / error / refused / unreachable), seconds, bytes."""
    sites = sorted({site for round_ in rounds for site in round_["sites"]})
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("round")
    for site in sites:
        table.add_column(site)
    table.add_column("seconds", justify="right")
    table.add_column("bytes", justify="right")
    for round_ in rounds:
        cells = []
        for site in sites:
            state = round_["sites"].get(site, "-")
            cells.append(f"[{_STYLES.get(state, 'red')}]{state}[/]" if state != "-" else "-")
        seconds = round_["seconds"]
        table.add_row(str(round_["index"]), round_["name"], *cells,
                      f"{seconds:.1f}" if isinstance(seconds, int | float) else "-", _size(round_["bytes"]))
    return table


class JournalProgress:
    """Redraw the rounds table from ``OUT/journal`` while a run is followed (a rich Live).

    Rounds already in the journal when it starts (a resumed run's) are shown too; with
    ``since`` (a new run's start, epoch seconds) a journal begun earlier (an older run's, until
    the new run replaces it) is not.
    """

    def __init__(self, out: Path, console: Console, interval_s: float = 1.0, since: float | None = None) -> None:
        self._out = out
        self._since = since
        self._interval_s = interval_s
        self._live = Live(self._table(), console=console, refresh_per_second=2, transient=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _table(self) -> Table:
        head = self._out / JOURNAL_DIR / "run.json"
        try:
            stale = self._since is not None and head.stat().st_mtime < self._since - 1.0
        except OSError:
            stale = True
        rounds = [] if stale else journal_rounds(self._out)
        return rounds_table(rounds, f"rounds done: {len(rounds)} (journal {self._out / JOURNAL_DIR})")

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._live.update(self._table())

    def __enter__(self) -> JournalProgress:
        self._live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._live.update(self._table())
        self._live.stop()


def participation_table(results: dict[str, Any]) -> Table:
    """The final summary per comparison: the sites used, attempts, dropped sites, rounds, time."""
    from coordinator.results import comparison_views

    table = Table(title="participation", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("comparison", "sites", "attempts", "dropped", "rounds", "seconds"):
        table.add_column(column)
    for view in comparison_views(results):
        part = view.get("participation", {})
        rounds = view.get("rounds", [])
        dropped = {str(d.get("site_id")): str(d.get("status", "?")) for d in part.get("dropped") or []}
        table.add_row(
            str(view["comparison_id"] or "-"), ", ".join(part.get("sites", [])) or "-", str(part.get("attempts", "-")),
            ", ".join(f"{site} ({status})" for site, status in sorted(dropped.items())) or "-", str(len(rounds)),
            f"{sum(float(r.get('seconds', 0)) for r in rounds):.1f}" if rounds else "-",
        )
    return table


def flow_run_url(prefect_api_url: str | None, results: dict[str, Any]) -> str | None:
    """The Prefect UI page of the study's flow run (the UI is served at the API URL minus /api)."""
    run_id = results.get("orchestration", {}).get("prefect_flow_run_id")
    if not prefect_api_url or not run_id:
        return None
    return f"{prefect_api_url.rstrip('/').removesuffix('/api')}/runs/flow-run/{run_id}"


def flow_run_state(prefect_api_url: str, flow_run_id: str) -> str:
    """The flow run's state name as the Prefect server has it, or why it could not be read."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(flow_run_id))
    except Exception as error:  # any failure to reach the server is reported, not raised
        return f"unknown ({type(error).__name__}: {error}; is the Prefect server at {prefect_api_url} up?)"
    return f"{run.state_name} ({run.name})"
