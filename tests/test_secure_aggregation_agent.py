"""Secure aggregation through the real site agent: Spark cohorts, the agent's key store and audit log.

Two site agents (the hand-built OMOP site of tests/test_cohort_rules.py, under two site ids)
answer a whole secure study from request bytes; the estimates equal a plain run's, and a
site whose policy requires secure aggregation refuses the plain study and logs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from shared.protocol.messages import decode_reply
from shared.protocol.model import StudyProtocol
from site_agent.agent import SiteAgent
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.pooled_reference import RELATIVE_TOLERANCE
from tests.test_cohort_rules import hand_built_site
from tests.test_site_agent import PROTOCOL


def study(secure: bool) -> StudyProtocol:
    data = PROTOCOL.model_dump(mode="json")
    data.update(
        analyses=["crude", "propensity"], secure_aggregation=secure, propensity={"l2": 1.0},
        covariates=[{"name": "age", "kind": "age"}, {"name": "sex", "kind": "sex"}],  # five persons a site
    )
    return StudyProtocol.model_validate(data)


def agent(tmp_path: Path, spark: SparkSession, site_id: str, require: bool = False) -> SiteAgent:
    hand_built_site().write(tmp_path / site_id / "lake")
    settings = SiteSettings(
        site_id=site_id, lake=tmp_path / site_id / "lake", workdir=tmp_path / site_id / "work",
        policy=DisclosurePolicy(min_cell_count=1, require_secure_aggregation=require),
        approval=ApprovalSettings(mode="auto"),
    )
    return SiteAgent(settings, spark=spark)


def run(protocol: StudyProtocol, agents: list[SiteAgent]) -> tuple[StudyPlan, list[bytes]]:
    plan, sent = StudyPlan(protocol), []
    while (request := plan.next_request()) is not None:
        raw = {a.site_id: a.handle(request.to_bytes()) for a in agents}
        sent.extend(raw.values())
        plan.absorb({site_id: decode_reply(reply) for site_id, reply in raw.items()})
    return plan, sent


@pytest.mark.slow
def test_a_secure_study_through_site_agents_equals_the_plain_one(tmp_path: Path, spark: SparkSession) -> None:
    agents = [agent(tmp_path, spark, "site_a"), agent(tmp_path, spark, "site_b")]
    secure, replies = run(study(True), agents)
    assert not any(b'"gradient":' in reply for reply in replies)  # model rounds carry masked vectors only
    plain, _ = run(study(False), agents)
    got, expected = secure.propensity(), plain.propensity()
    assert got is not None
    assert expected is not None
    assert set(got["coefficients"]) == set(expected["coefficients"])
    for column, value in expected["coefficients"].items():
        assert got["coefficients"][column] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-12)
    crude, plain_crude = secure.analyses()["crude"], plain.analyses()["crude"]
    assert crude["n_exposed"] == plain_crude["n_exposed"]
    assert crude.get("error") == plain_crude.get("error")  # the hand-built sites' arms may lack events
    if "hr" in plain_crude:
        assert crude["hr"] == pytest.approx(plain_crude["hr"], rel=RELATIVE_TOLERANCE)


def test_a_site_requiring_secure_aggregation_refuses_a_plain_study_and_logs_it(tmp_path: Path, spark: SparkSession) -> None:
    strict = agent(tmp_path, spark, "site_s", require=True)
    request = StudyPlan(study(False)).next_request()
    assert request is not None
    reply = decode_reply(strict.handle(request.to_bytes()))
    assert reply.status == "refused"
    assert "this site's policy requires secure aggregation" in (reply.error or "")
    log = [json.loads(line) for line in (tmp_path / "site_s" / "work" / "audit" / "releases.jsonl").read_text().splitlines()]
    assert log[-1]["decision"] == "refused"
