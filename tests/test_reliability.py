"""Sites that drop out, a coordinator that crashes, reruns: the study survives, nothing is lost.

The study logic runs here over real site agents (real Spark, real Delta) and a real Prefect
server, with an in-process wire that can lose a site or "crash" the coordinator on cue.
tests/test_faults.py injects the same faults into real Flower processes with signals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from deltalake import DeltaTable
from prefect.settings import PREFECT_API_URL, temporary_settings
from pyspark.sql import SparkSession

from coordinator.journal import RoundJournal
from coordinator.participation import Participation, attempt_run_id
from coordinator.plan import StudyPlan
from coordinator.results import stable_differences, stable_view
from flows.rounds import RoundOutcome, decode_replies, sort_replies
from flows.study import study_flow
from shared.errors import InsufficientSites, NoReply, SettingsError
from shared.protocol.messages import RoundReply, RoundRequest
from shared.protocol.model import Quorum, load_protocol
from shared.synthetic import generate_network
from site_agent.agent import SiteAgent
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.inprocess import InProcessTransport
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled

PROTOCOL = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")
NODE_OF = {"site_01": 101, "site_02": 102, "site_03": 103}


class Crash(Exception):
    """The coordinator process dies (raised from inside a round)."""


class FaultyWire(InProcessTransport):
    """The in-process wire, plus faults: a site that goes silent from the n-th exchange on,
    and a coordinator that dies during the n-th exchange (both counted from 1)."""

    def __init__(self, agents: list[SiteAgent], silent: tuple[str, int] | None = None, crash_at: int | None = None) -> None:
        super().__init__(agents)
        self.silent = silent
        self.crash_at = crash_at
        self.calls = 0

    def exchange(self, round_name: str, payloads: Mapping[int, bytes], timeout_s: float) -> dict[int, bytes]:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise Crash(f"coordinator killed during {round_name}")
        if self.silent is None or self.calls < self.silent[1] or NODE_OF[self.silent[0]] not in payloads:
            return super().exchange(round_name, payloads, timeout_s)
        node = NODE_OF[self.silent[0]]
        replies = super().exchange(round_name, {n: p for n, p in payloads.items() if n != node}, timeout_s)
        raise NoReply(f"round {round_name!r}: no reply from SuperNode(s) [{node}]", replies, [node])


@pytest.fixture(scope="module")
def network(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reliability")
    generate_network(root / "data", n_sites=3, n_patients=6_000, seed=11)
    # at this size a site holds fewer than 10 persons of some covariate level; a minimum of 3
    # keeps every site's propensity model (the default policy would withhold it)
    policy = DisclosurePolicy(min_cell_count=3)
    agents = [
        SiteAgent(SiteSettings(site_id=site.name, lake=site / "lake", workdir=root / "work" / site.name,
                               policy=policy, approval=ApprovalSettings(mode="auto")), spark=spark)
        for site in sorted((root / "data" / "sites").iterdir())
    ]
    return {"agents": agents, "root": root}


def _run(network: dict[str, Any], prefect_api_url: str, out: Path, wire: FaultyWire, **options: Any) -> dict[str, Any]:
    protocol = options.pop("protocol", PROTOCOL)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
        return dict(study_flow(wire, protocol, str(out), 60.0, **options))


def _stable_bytes(results: dict[str, Any]) -> bytes:
    return json.dumps(stable_view(results), sort_keys=True).encode()


@pytest.fixture(scope="module")
def clean(network: dict[str, Any], prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(network, prefect_api_url, tmp_path_factory.mktemp("clean"), FaultyWire(network["agents"]))


# ---------------------------------------------------------------- determinism


def test_a_rerun_gives_byte_identical_results_but_for_ids_and_clocks(
    network: dict[str, Any], clean: dict[str, Any], prefect_api_url: str, tmp_path: Path,
) -> None:
    again = _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"]))
    assert again["run_id"] != clean["run_id"]
    assert stable_differences(again, clean) == []
    assert _stable_bytes(again) == _stable_bytes(clean)
    # the volatile fields are only ids, clocks and durations (and, signed, message sizes)
    assert set(clean) - set(stable_view(clean)) == {"run_id", "generated_at", "orchestration"}
    changed = json.loads(json.dumps(again))
    changed["analyses"]["crude"]["hr"] += 1e-12
    assert stable_differences(changed, clean) == [
        f"results.analyses.crude.hr: {json.dumps(changed['analyses']['crude']['hr'])} != {json.dumps(clean['analyses']['crude']['hr'])}"]


# ---------------------------------------------------------------- coordinator crash and resume


@pytest.mark.parametrize("crash_point", ["first", pytest.param("third", marks=pytest.mark.slow), "last"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(
    network: dict[str, Any], clean: dict[str, Any], prefect_api_url: str, tmp_path: Path, crash_point: str,
) -> None:
    """The coordinator dies during its first, third or last exchange, then resumes."""
    crash_at = {"first": 1, "third": 3, "last": len(clean["rounds"])}[crash_point]
    with pytest.raises(Crash):
        _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"], crash_at=crash_at))
    journaled = sorted(p.name for p in (tmp_path / "journal").glob("[0-9]*.json"))
    assert len(journaled) == crash_at - 1  # every round before the crash, and not the one it hit
    assert not (tmp_path / "results.json").exists()
    # a new run into the same folder would lose the journal: refused, naming the resume command
    with pytest.raises(SettingsError, match=r"unfinished run .*fedrwe study resume ketamine_cud_anaesthesia"):
        _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"]))
    wire = FaultyWire(network["agents"])
    resumed = _run(network, prefect_api_url, tmp_path, wire, resume=True)
    assert resumed["orchestration"]["rounds_replayed"] == crash_at - 1
    assert wire.calls == len(clean["rounds"]) - (crash_at - 1)  # only the missing rounds went out
    assert stable_differences(resumed, clean) == []
    assert _stable_bytes(resumed) == _stable_bytes(clean)
    assert json.loads((tmp_path / "journal" / "run.json").read_text())["status"] == "complete"
    with pytest.raises(SettingsError, match="is complete"):
        _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"]), resume=True)


def test_resume_refuses_another_protocol(
    network: dict[str, Any], prefect_api_url: str, tmp_path: Path,
) -> None:
    with pytest.raises(Crash):
        _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"], crash_at=2))
    changed = PROTOCOL.model_copy(update={"washout_days": 180})
    with pytest.raises(SettingsError, match="a resumed run must ask the same questions"):
        _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"]), resume=True, protocol=changed)


# ---------------------------------------------------------------- sites that drop out


def _pooled(network: dict[str, Any], sites: list[str]) -> pd.DataFrame:
    return pd.concat(
        DeltaTable(str(network["root"] / "work" / site / "studies" / PROTOCOL.study_id / "analysis_dataset")).to_pandas()
        for site in sites
    )


def _two_site_plan(network: dict[str, Any]) -> StudyPlan:
    """The same study run directly on site_01 and site_02 only (the reference for a dropout)."""
    agents = [a for a in network["agents"] if a.site_id != "site_03"]
    wire = InProcessTransport(agents)
    plan = StudyPlan(PROTOCOL, run_id="f" * 32)
    while (request := plan.next_request()) is not None:
        payload = request.to_bytes()
        plan.absorb(decode_replies(wire.exchange(request.round_name, dict.fromkeys(wire.node_ids(), payload), 60)))
    return plan


@pytest.mark.parametrize("silent_from", [1, 3])
def test_a_site_lost_mid_study_is_left_out_and_the_fit_restarts_on_the_others(
    network: dict[str, Any], prefect_api_url: str, tmp_path: Path, silent_from: int,
) -> None:
    """site_03 stops answering at exchange 1 (the summary round: the study goes on without it)
    or 3 (a Newton round: the comparison restarts from round 1 on site_01 and site_02). Either
    way every estimate equals the two sites' pooled rows and a clean two-site run."""
    results = _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"], silent=("site_03", silent_from)))
    participation = results["participation"]
    assert participation["sites"] == ["site_01", "site_02"]
    assert participation["attempts"] == (1 if silent_from == 1 else 2)
    [dropout] = participation["dropped"]
    # a node silent from its first round never named its site; later the coordinator knows it
    assert dropout["site_id"] == ("node-103" if silent_from == 1 else "site_03")
    assert dropout["status"] == "unavailable"
    assert "no reply within the round's timeout of 60 s" in dropout["reason"]
    assert [s["site_id"] for s in results["sites"]] == ["site_01", "site_02"]
    if silent_from == 3:  # the attempt's rounds are on record, named after it
        assert any(r["name"].startswith("attempt-2/1-summary") for r in results["rounds"])
    pooled = _pooled(network, ["site_01", "site_02"])
    assert_crude_equals_pooled(results["analyses"]["crude"], pooled)
    assert_propensity_equals_pooled(results["propensity"], pooled)
    reference = _two_site_plan(network).analyses()
    assert json.dumps(results["analyses"], sort_keys=True) == json.dumps(reference, sort_keys=True)


def test_a_quorum_the_dropout_breaks_fails_the_study_naming_the_site_and_fix(
    network: dict[str, Any], prefect_api_url: str, tmp_path: Path,
) -> None:
    strict = PROTOCOL.model_copy(update={"quorum": Quorum(min_sites=3)})
    with pytest.raises(InsufficientSites) as failure:
        _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"], silent=("site_03", 3)), protocol=strict)
    message = str(failure.value)
    assert "2 site(s) remain (['site_01', 'site_02']) and the quorum needs 3" in message
    assert re.search(r"site_03 at \d-\w+ \(unavailable: no reply within the round's timeout of 60 s\)", message)
    assert "Fix: bring the dropped sites back" in message
    head = json.loads((tmp_path / "journal" / "run.json").read_text())
    assert head["status"] == "failed"
    assert head["error"].startswith("InsufficientSites: ")
    # a failed run is no crash: a new run into the same folder replaces its journal
    again = _run(network, prefect_api_url, tmp_path, FaultyWire(network["agents"]))
    assert again["participation"]["dropped"] == []


# ---------------------------------------------------------------- the pieces, without Spark


def _request(participants: list[str] | None) -> RoundRequest:
    return RoundRequest(study_id="s", run_id="a" * 32, round_name="2-newton", round_index=2, protocol={},
                        protocol_sha256="b" * 64, tasks={}, participants=participants)


def test_sort_replies_names_every_kind_of_unreachable_site() -> None:
    ok = RoundReply(status="ok", site_id="site_01", study_id="s", round_name="2-newton")
    gone = RoundReply(status="unavailable", site_id="node-7", error="Flower error 5: node offline")
    outsider = RoundReply(status="refused", site_id="site_09", error="not a participant")
    outcome = sort_replies(
        _request(["site_01", "site_02", "site_03", "site_04"]),
        {"site_01": ok, "node-7": gone, "site_09": outsider},
        {"site_01": 5, "node-7": 7, "site_09": 9}, silent_nodes=[8],
        known_nodes={7: "site_02", 8: "site_03"}, timeout_s=30.0,
    )
    assert outcome.replies == {"site_01": ok}  # the non-participant's refusal is not an answer
    assert outcome.unreachable == {
        "site_02": "Flower error 5: node offline",
        "site_03": "no reply within the round's timeout of 30 s",
        "site_04": "its SuperNode is not connected to the SuperLink",
    }
    assert outcome.failed()["site_04"] == ("unavailable", "its SuperNode is not connected to the SuperLink")
    assert outcome.lost_nodes == [7, 8]  # left out of the rest of the run
    # once the participants are known, a silent node that is none of theirs is no loss
    later = sort_replies(_request(["site_01"]), {"site_01": ok}, {"site_01": 5}, [8], {8: "site_03"}, 30.0)
    assert later.unreachable == {}
    assert later.lost_nodes == [8]
    stale = RoundReply(status="ok", site_id="site_01", study_id="s", round_name="1-summary")
    wrong = sort_replies(_request(None), {"site_01": stale}, {"site_01": 5}, [], {}, 30.0)
    assert wrong.failed()["site_01"][0] == "error"
    assert "answered ('s', '1-summary') to round ('s', '2-newton')" in wrong.failed()["site_01"][1]


def test_a_round_outcome_survives_the_journal_exactly() -> None:
    reply = RoundReply(status="ok", site_id="site_01", results={"x": [0.1, 1e-300, 2.0000000000000004]})
    outcome = RoundOutcome({"site_01": reply}, {"site_02": "gone"}, {"site_01": 3}, {"site_01": "k1"}, {"name": "r"})
    back = RoundOutcome.from_json(json.loads(json.dumps(outcome.to_json())))
    assert back == outcome


def test_the_journal_refuses_a_changed_request_and_a_gap(tmp_path: Path) -> None:
    journal = RoundJournal.start(tmp_path, "s", "c" * 64, "a" * 32)
    journal.record("1-summary", b"request one", {"replies": {}})
    journal.record("2-newton", b"request two", {"replies": {}})
    resumed = RoundJournal.resume(tmp_path, "s", "c" * 64)
    assert resumed.replay("1-summary", b"request one") == {"replies": {}}
    with pytest.raises(SettingsError, match="the coordinator's software or the protocol changed"):
        resumed.replay("2-newton", b"another request two")
    with pytest.raises(SettingsError, match="holds a run of study 's', not 't'"):
        RoundJournal.resume(tmp_path, "t", "c" * 64)
    (tmp_path / "journal" / "0001.json").unlink()
    with pytest.raises(SettingsError, match="lacks round 1"):
        RoundJournal.resume(tmp_path, "s", "c" * 64)
    with pytest.raises(SettingsError, match="no study run to resume"):
        RoundJournal.resume(tmp_path / "elsewhere", "s", "c" * 64)


def test_quorum_checks_and_attempt_ids() -> None:
    participation = Participation("s", Quorum(min_sites=2, required_sites=["site_01"]))
    participation.check("a", ["site_01", "site_02"])
    participation.drop("a", "a/2-newton", {"site_01": ("error", "disk full")})
    with pytest.raises(InsufficientSites, match=r"required site\(s\) \['site_01'\] are not among them"):
        participation.check("a", ["site_02", "site_03"])
    assert participation.of("a")[0]["reason"] == "disk full"
    assert participation.of("b") == []
    assert attempt_run_id("a" * 32, "b", 1) == "a" * 32
    assert attempt_run_id("a" * 32, "b", 2) == attempt_run_id("a" * 32, "b", 2) != attempt_run_id("a" * 32, "c", 2)
    assert len(attempt_run_id("a" * 32, None, 3)) == 32
