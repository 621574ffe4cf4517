"""The operator's CLI: live round progress, study status/report, site status, errors and --json.

Journals, results.json and audit logs are written here as the ServerApp and the site agent
write them (coordinator/journal.py, site_agent/audit/delta_log.py); no process is started.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from rich.console import Console
from typer.testing import CliRunner

from coordinator.journal import RoundJournal
from flows.cli import app, main
from flows.progress import JournalProgress, flow_run_url, participation_table, study_status
from flows.study import flow_run_name
from shared.protocol.model import load_protocol
from site_agent.approval import approval_store
from site_agent.audit.delta_log import DeltaAuditLog
from tests.test_report import results as report_results

PROTOCOL_PATH = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"
PROTOCOL = load_protocol(PROTOCOL_PATH)
FLOW_RUN_ID = "0f4c7a52-1f0e-4f59-9a43-3c1c2f1d9b10"


def outcome(name: str, replies: dict[str, str], unreachable: tuple[str, ...] = (), seconds: float = 1.5) -> dict[str, Any]:
    """A round's outcome as RoundOutcome.to_json journals it."""
    return {
        "replies": {site: {"status": status, "site_id": site} for site, status in replies.items()},
        "unreachable": dict.fromkeys(unreachable, "no reply within the round's timeout of 60 s"),
        "nodes": {}, "verified": {},
        "record": {"name": name, "seconds": seconds, "bytes_sent": 2048, "bytes_received": 1024,
                   "sites": sorted(replies)},
    }


def journal_with_two_rounds(out: Path) -> RoundJournal:
    journal = RoundJournal.start(out, "s", "ab" * 32, "run123")
    journal.record("1-summary", b"request one", outcome("1-summary", {"site_a": "ok", "site_b": "ok", "site_c": "ok"}))
    journal.record("2-propensity", b"request two", outcome("2-propensity", {"site_a": "ok", "site_b": "refused"},
                                                           unreachable=("site_c",)))
    return journal


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, terminal_width=300)
    assert result.exit_code == 0, result.output
    return result.output


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``fedrwe ARGS`` through the real entry point (its error handling): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["fedrwe", *args])
    monkeypatch.setattr("flows.cli._state", {"debug": False, "json": False})
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_study_status_shows_rounds_per_site_and_the_dropped_sites(tmp_path: Path) -> None:
    journal_with_two_rounds(tmp_path)
    shown = invoke("study", "status", "--out", str(tmp_path))
    assert "running, 2 round(s) done" in shown
    assert "2-propensity" in shown
    assert "refused" in shown
    assert "unreachable" in shown
    assert "dropped (last status not ok): site_b, site_c" in shown
    assert "fedrwe study resume s" in shown
    status = json.loads(invoke("study", "status", "--out", str(tmp_path), "--json"))
    assert status["state"] == "running"
    assert status["rounds_done"] == 2
    assert status["sites"] == {"site_a": "ok", "site_b": "refused", "site_c": "unreachable"}
    assert status["rounds"][0]["bytes"] == 3072
    assert "results" not in status


def test_a_complete_run_links_its_results_and_its_prefect_flow_run(tmp_path: Path) -> None:
    journal_with_two_rounds(tmp_path).complete()
    results = {**report_results(), "run_id": "run123", "orchestration": {"prefect_flow_run_id": FLOW_RUN_ID}}
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    status = study_status(tmp_path)
    assert status["state"] == "complete"
    assert status["prefect_flow_run_id"] == FLOW_RUN_ID
    assert flow_run_url("http://127.0.0.1:4200/api", results) == f"http://127.0.0.1:4200/runs/flow-run/{FLOW_RUN_ID}"
    assert flow_run_url(None, results) is None
    with socket.socket() as closed:  # a port nobody listens on: the state is reported unknown, not raised
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    shown = invoke("study", "status", "--out", str(tmp_path), "--prefect-api-url", f"http://127.0.0.1:{port}/api")
    assert "complete, 2 round(s) done" in shown
    assert f"Prefect flow run {FLOW_RUN_ID}: unknown" in shown
    assert "results:" in shown


def test_a_failed_run_shows_the_servers_reason(tmp_path: Path) -> None:
    journal_with_two_rounds(tmp_path)
    (tmp_path / "error.txt").write_text("InsufficientSites: 1 site left, the quorum is 2\n", encoding="utf-8")
    status = json.loads(invoke("study", "status", "--out", str(tmp_path), "--json"))
    assert status["state"] == "failed"
    assert status["error"] == "InsufficientSites: 1 site left, the quorum is 2"


def test_the_live_view_draws_the_rounds_journaled_while_it_runs(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    with JournalProgress(tmp_path, console, interval_s=0.05):
        journal_with_two_rounds(tmp_path)
    drawn = buffer.getvalue()
    assert "rounds done: 2" in drawn
    assert "1-summary" in drawn
    assert "site_c" in drawn


def test_study_report_re_renders_report_html_from_results_json(tmp_path: Path) -> None:
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"hr_conditional": 1.98, "marginal_effect_in_treated": {"risk_ratio": 1.78}}))
    results = {**report_results(), "simulation": {"truth_path": str(truth)}}
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    shown = invoke("study", "report", "s", "--out", str(tmp_path))
    assert "wrote" in shown
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Ketamine &lt;and&gt; CUD" in html
    assert "1.98" in html  # the planted truth, read from results' truth_path


def test_errors_are_one_line_with_the_fix_and_the_traceback_only_with_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(report_results()), encoding="utf-8")
    code, out, err = run_main(monkeypatch, capsys, "study", "report", "other", "--out", str(tmp_path))
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert "fedrwe:" in err
    assert "Fix: pass 's'" in err
    code, _, err = run_main(monkeypatch, capsys, "--debug", "study", "report", "other", "--out", str(tmp_path))
    assert code == 2
    assert "Traceback" in err
    assert "Fix: pass 's'" in err
    code, _, err = run_main(monkeypatch, capsys, "study", "status", "--out", str(tmp_path / "nothing"))
    assert code == 2
    assert "no study run in" in err
    assert "Fix:" in err


def test_study_run_json_prints_only_a_json_error_object(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, out, err = run_main(monkeypatch, capsys, "study", "run", str(PROTOCOL_PATH), "--superlink",
                              "127.0.0.1:1", "--out", str(tmp_path), "--json")
    assert code == 2
    error = json.loads(out)
    assert error["error"] == "SettingsError"
    assert "Fix:" in error["message"]
    assert err == ""


def test_the_flow_run_is_named_after_the_study_its_comparisons_and_the_flower_run() -> None:
    count = len(PROTOCOL.comparison_ids())
    name = flow_run_name(PROTOCOL, {"flower-run-id": 4242}, resume=False)
    assert name.startswith(f"{PROTOCOL.study_id} ({count} comparison")
    assert name.endswith("flower-run 4242")
    assert flow_run_name(PROTOCOL, {}, resume=True).endswith(" resumed")


def test_site_status_tells_the_steward_what_ran_waits_and_was_released(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(tomli_w.dumps({"site_id": "s1", "lake": str(tmp_path / "lake"), "workdir": str(tmp_path / "work")}))
    assert json.loads(invoke("site", "status", "--config", str(config), "--json"))["entries"] == 0
    audit = DeltaAuditLog(tmp_path / "work" / "audit")
    for round_name, decision in (("1-summary", "released"), ("2-propensity", "released with parts withheld"),
                                 ("3-outcome", "suppressed"), ("3-outcome", "replayed")):
        audit.append(site_id="s1", study_id="study_a", round_name=round_name, decision=decision)
    audit.append(site_id="s1", study_id="study_b", round_name="1-summary", decision="refused: protocol not approved")
    store = approval_store(tmp_path / "work")
    store.record_pending(PROTOCOL)
    status = json.loads(invoke("site", "status", "--config", str(config), "--json"))
    assert status["entries"] == 5
    assert status["studies"]["study_a"]["decisions"] == {"released": 1, "replayed": 1, "suppressed": 1, "withheld": 1}
    assert status["studies"]["study_a"]["rounds"] == ["1-summary", "2-propensity", "3-outcome"]
    assert status["studies"]["study_b"]["decisions"] == {"refused": 1}
    assert [p["study_id"] for p in status["pending"]] == [PROTOCOL.study_id]
    shown = invoke("site", "status", "--config", str(config))
    assert "study_a" in shown
    assert f"pending approval: {PROTOCOL.study_id}" in shown
    assert f"--sha256 {PROTOCOL.sha256()}" in shown
    store.approve(PROTOCOL.study_id, None, by="dr_who")
    shown = invoke("site", "status", "--config", str(config))
    assert "pending approval: none" in shown
    assert f"approved: {PROTOCOL.study_id}" in shown
    assert "dr_who" in shown


def test_a_new_runs_view_hides_the_older_journal_until_it_is_replaced(tmp_path: Path) -> None:
    journal_with_two_rounds(tmp_path).complete()
    old = tmp_path / "journal" / "run.json"
    os.utime(old, (1_000_000.0, 1_000_000.0))  # the earlier run's journal
    buffer = io.StringIO()
    with JournalProgress(tmp_path, Console(file=buffer, width=200), interval_s=0.05, since=time.time()):
        time.sleep(0.2)
    assert "rounds done: 0" in buffer.getvalue()
    assert "2-propensity" not in buffer.getvalue()



def test_the_final_summary_names_each_comparisons_sites_and_dropouts() -> None:
    dropout = {"site_id": "site_02", "comparison": None, "round_name": "1-summary", "status": "error",
               "reason": "table 'death' is missing"}
    results = {**report_results(), "participation": {"sites": ["site_01", "site_03"], "attempts": 1,
                                                     "dropped": [dropout]}}
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(participation_table(results))
    row = next(line for line in buffer.getvalue().splitlines() if "site_01" in line)
    assert "site_01, site_03" in row
    assert "site_02 (error)" in row
    assert " 66.0" in row  # the seconds of the results' one round
