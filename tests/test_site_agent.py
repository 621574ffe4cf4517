"""The site agent's request handling: the guard uses the site's policy, errors are replies."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from shared.protocol.messages import decode_reply
from shared.protocol.model import StudyProtocol, load_protocol
from site_agent.agent import SiteAgent
from site_agent.audit.log import verify_chain
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.omop_builder import OmopBuilder
from tests.test_cohort_rules import hand_built_site

PROTOCOL = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")


def agent_for(
    tmp_path: Path, spark: SparkSession, min_cell_count: int, builder: OmopBuilder | None = None, **policy: Any,
) -> SiteAgent:
    (builder or hand_built_site()).write(tmp_path / "lake")
    settings = SiteSettings(
        site_id="site_t", lake=tmp_path / "lake", workdir=tmp_path / "work",
        policy=DisclosurePolicy(min_cell_count=min_cell_count, **policy), approval=ApprovalSettings(mode="auto"),
    )
    return SiteAgent(settings, spark=spark)


@pytest.fixture(scope="module")
def strict_agent(tmp_path_factory: pytest.TempPathFactory, spark: SparkSession) -> SiteAgent:
    # a cohort this small is refused whole by default (min_cohort_size): 1 lets the cell check speak
    return agent_for(tmp_path_factory.mktemp("strict"), spark, min_cell_count=10, min_cohort_size=1)


@pytest.fixture(scope="module")
def open_agent(tmp_path_factory: pytest.TempPathFactory, spark: SparkSession) -> SiteAgent:
    # the hand-built cohort has fewer persons than the PS model has parameters: allowed here
    return agent_for(tmp_path_factory.mktemp("open"), spark, min_cell_count=1, max_parameters_per_patients=0.0)


def summary_request() -> bytes:
    request = StudyPlan(PROTOCOL).next_request()
    assert request is not None
    return request.to_bytes()


def test_small_counts_are_refused_by_the_sites_policy(strict_agent: SiteAgent) -> None:
    agent = strict_agent
    reply = decode_reply(agent.handle(summary_request()))
    assert reply.status == "refused"
    assert reply.results == {}
    assert "exposed.events" in (reply.error or "")
    assert "=" not in (reply.error or "")  # the small value itself never leaves
    log = agent.settings.workdir / "audit" / "releases.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["withheld"]["exposed.events"] == 1  # ... but the steward can see it
    assert "site 'site_t'" in (reply.error or "")
    assert "minimum cell count 10" in (reply.error or "")


def test_the_request_cannot_lower_the_threshold(strict_agent: SiteAgent) -> None:
    agent = strict_agent
    request = json.loads(summary_request())
    request["tasks"]["arm_summary"] = {"min_cell_count": 1}
    reply = decode_reply(agent.handle(json.dumps(request).encode()))
    assert reply.status == "refused"


def test_release_passes_when_policy_allows_and_every_decision_is_logged(tmp_path: Path, spark: SparkSession) -> None:
    agent = agent_for(tmp_path, spark, min_cell_count=1, max_parameters_per_patients=0.0)
    reply = decode_reply(agent.handle(summary_request()))
    assert reply.status == "ok", reply.error
    assert reply.results["arm_summary"]["exposed"] == {"n": 3, "events": 1, "person_days": 60 + 365 + 365}
    agent.handle(b"not json")
    log = agent.settings.workdir / "audit" / "releases.jsonl"
    decisions = [json.loads(line)["decision"] for line in log.read_text().splitlines()]
    assert decisions == ["released", "error"]
    assert verify_chain(log) is None
    lines = log.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["decision"] = "refused"
    log.write_text(json.dumps(edited, sort_keys=True) + "\n" + lines[1] + "\n")
    assert verify_chain(log) == 1


def test_wrong_schema_version_and_unknown_task_are_clear_errors(open_agent: SiteAgent) -> None:
    agent = open_agent
    request = json.loads(summary_request())
    reply = decode_reply(agent.handle(json.dumps({**request, "schema_version": 99}).encode()))
    assert reply.status == "error"
    assert "schema_version 99" in (reply.error or "")
    request["tasks"] = {"propensity_magic": {}}
    reply = decode_reply(agent.handle(json.dumps(request).encode()))
    assert reply.status == "error"
    assert "propensity_magic" in (reply.error or "")


def test_a_tampered_protocol_is_refused(open_agent: SiteAgent) -> None:
    agent = open_agent
    request = json.loads(summary_request())
    request["protocol"]["washout_days"] = 0
    reply = decode_reply(agent.handle(json.dumps(request).encode()))
    assert reply.status == "error"
    assert "hashes to" in (reply.error or "")


def test_a_port_in_use_is_a_clear_error(open_agent: SiteAgent) -> None:
    import socket

    from shared.errors import TransportError
    from site_agent.service import bind

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = open_agent.settings.model_copy(update={"port": port})
        with pytest.raises(TransportError, match=rf"port {port} on 127.0.0.1 is already in use.*Fix"):
            bind(settings, open_agent)


def test_extreme_coefficients_are_not_evaluated(open_agent: SiteAgent) -> None:
    request = json.loads(summary_request())
    request["tasks"] = {"crude_cox": {"beta": -60.0}, "arm_summary": {}}
    reply = decode_reply(open_agent.handle(json.dumps(request).encode()))
    assert reply.status == "ok"  # the model task is withheld alone; the counts still go
    assert reply.results["crude_cox"] == {"withheld": reply.results["crude_cox"]["withheld"]}
    assert "|beta| <= 20" in reply.results["crude_cox"]["withheld"]
    assert "exposed" in reply.results["arm_summary"]


def test_tasks_outside_the_protocols_analyses_are_refused(open_agent: SiteAgent) -> None:
    request = json.loads(summary_request())
    protocol = dict(request["protocol"], analyses=["crude"])
    request["protocol"] = protocol
    request["protocol_sha256"] = load_protocol_from(protocol).sha256()
    request["tasks"] = {"propensity": {}}
    reply = decode_reply(open_agent.handle(json.dumps(request).encode()))
    assert reply.status == "error"
    assert "['propensity'] are not part of study" in (reply.error or "")


def test_a_request_for_another_study_is_refused(open_agent: SiteAgent) -> None:
    request = json.loads(summary_request())
    request["study_id"] = "some_other_study"
    reply = decode_reply(open_agent.handle(json.dumps(request).encode()))
    assert reply.status == "error"
    assert "carries the protocol of study" in (reply.error or "")


def test_attrition_steps_that_remove_few_persons_are_suppressed() -> None:
    from site_agent.analyses.counts import attrition
    from site_agent.cohort.builder import AttritionStep
    from site_agent.disclosure.guard import check_release

    steps = [
        AttritionStep("entry", "", 900, None, None),
        AttritionStep("arm", "", 200, 100, 100),
        AttritionStep("washout", "", 180, 97, 83),  # removes 3 exposed: 100 would reveal them
        AttritionStep("age", "", 170, 87, 83),
    ]
    release = attrition(steps, min_cell_count=10)
    rows = {row["step"]: row for row in release.values["steps"]}
    assert (rows["arm"]["n_exposed"], rows["arm"]["n_comparator"], rows["arm"]["n_persons"]) == (None, 100, None)
    assert rows["arm"]["suppressed"] is True
    assert (rows["washout"]["n_exposed"], rows["age"]["n_exposed"]) == (97, 87)
    assert rows["entry"]["n_persons"] == 900
    check_release("attrition", release, DisclosurePolicy(min_cell_count=10), "site_t")  # passes
    shown = [row["n_exposed"] for row in release.values["steps"] if row["n_exposed"] is not None]
    assert all(a - b == 0 or a - b >= 10 for a, b in itertools.pairwise(shown))


def test_site_service_binds_loopback_only(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="host"):
        SiteSettings(site_id="s", lake=tmp_path, workdir=tmp_path, host="0.0.0.0")  # type: ignore[arg-type]


def load_protocol_from(data: dict[str, object]) -> StudyProtocol:
    from shared.protocol.model import parse_protocol

    return parse_protocol(data)


def test_the_service_refuses_a_taken_port_before_starting_spark(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "site.toml"
        config.write_text(f'site_id = "site_p"\nlake = "{tmp_path}"\nworkdir = "{tmp_path}"\nport = {port}\n')
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "site", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in " ".join(done.stderr.split())
    assert time.monotonic() - started < 20  # no Spark start before the check
