"""`fedrwe site pending/approve/approvals` and `fedrwe keys new/trust`, in process (no Spark)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from flows.cli import app
from shared.crypto import load_keyring
from shared.errors import SettingsError
from shared.protocol.model import load_protocol
from site_agent.approval import approval_store

PROTOCOL = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")


def site_config(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps({"site_id": "s1", "lake": str(tmp_path / "lake"), "workdir": str(tmp_path / "work")}))
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, terminal_width=400)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_steward_sees_the_pending_study_and_approves_its_hash(tmp_path: Path) -> None:
    config = site_config(tmp_path)
    assert "no study is waiting" in run("site", "pending", "--config", str(config))
    approval_store(tmp_path / "work").record_pending(PROTOCOL)  # what the agent does on refusal
    listed = run("site", "pending", "--config", str(config))
    assert PROTOCOL.study_id in listed
    assert PROTOCOL.sha256() in listed
    approved = run("site", "approve", PROTOCOL.study_id, "--config", str(config), "--by", "dr_who")
    assert PROTOCOL.sha256() in approved
    assert "dr_who" in approved
    assert "no study is waiting" in run("site", "pending", "--config", str(config))
    given = run("site", "approvals", "--config", str(config))
    assert "dr_who" in given
    assert PROTOCOL.sha256() in given
    store = approval_store(tmp_path / "work")
    assert store.approval_for(PROTOCOL.study_id, PROTOCOL.sha256()) is not None
    assert store.approval_for(PROTOCOL.study_id, "0" * 64) is None


def test_approving_without_a_pending_protocol_or_with_a_bad_hash_is_a_clear_error(tmp_path: Path) -> None:
    store = approval_store(tmp_path / "work")
    with pytest.raises(SettingsError, match="fedrwe site pending"):
        store.approve("nothing_pending", None, by="x")
    with pytest.raises(SettingsError, match="64 lowercase hex"):
        store.approve("study", "ABC", by="x")
    assert store.approvals() == []


def test_keys_new_and_trust_rotate_an_owners_key(tmp_path: Path) -> None:
    run("keys", "new", "--owner", "coordinator", "--out", str(tmp_path / "old"))
    run("keys", "new", "--owner", "coordinator", "--out", str(tmp_path / "new"))
    ring = tmp_path / "coordinator.keyring.json"
    run("keys", "trust", str(ring), "--add", str(tmp_path / "old" / "coordinator.keyring.json"))
    run("keys", "trust", str(ring), "--add", str(tmp_path / "new" / "coordinator.keyring.json"),
        "--retire-others-at", "2030-01-01T00:00+00:00")
    new_id = load_keyring(tmp_path / "new" / "coordinator.keyring.json").entries()[0].key_id
    entries = {e.key_id: e.retires_at for e in load_keyring(ring).entries()}
    assert len(entries) == 2
    assert entries[new_id] is None
    assert [r for k, r in entries.items() if k != new_id] == [1893456000.0]
