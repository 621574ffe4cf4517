"""Federated equals pooled for the crude Cox model, counts and the propensity model, on the synthetic network.

Three site agents (real Spark, real Delta) answer the study's rounds in process; the
coordinator's plan combines them. The pooled reference is statsmodels' PHReg on every
site's analysis rows stacked (Breslow ties, stratified by site), and the generator's own
answer key checks the Spark cohort counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from flows.study import decode_replies
from shared.protocol.model import load_protocol
from shared.synthetic import generate_network
from site_agent.agent import SiteAgent
from site_agent.settings import SiteSettings
from tests.inprocess import InProcessTransport
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled

PROTOCOL = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")


@pytest.fixture(scope="module")
def network(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("network")
    generate_network(root / "data", n_sites=3, n_patients=8_000, seed=11)
    agents = [
        SiteAgent(
            SiteSettings(site_id=site.name, lake=site / "lake", workdir=root / "work" / site.name),
            spark=spark,
        )
        for site in sorted((root / "data" / "sites").iterdir())
    ]
    transport = InProcessTransport(agents)
    plan = StudyPlan(PROTOCOL)
    while (request := plan.next_request()) is not None:
        payload = request.to_bytes()
        plan.absorb(decode_replies(transport.exchange(request.round_name, dict.fromkeys(transport.node_ids(), payload), 60)))
    pooled = pd.concat(
        DeltaTable(str(agent.settings.workdir / "studies" / PROTOCOL.study_id / "analysis_dataset")).to_pandas()
        for agent in agents
    )
    truth = json.loads((root / "data" / "truth.json").read_text())
    return {"plan": plan, "pooled": pooled, "truth": truth, "agents": agents, "transport": transport}


def test_crude_hr_and_counts_equal_statsmodels_on_the_pooled_rows(network: dict[str, Any]) -> None:
    assert_crude_equals_pooled(network["plan"].analyses()["crude"], network["pooled"])


def test_propensity_model_equals_statsmodels_logit_on_the_pooled_rows(network: dict[str, Any]) -> None:
    propensity = network["plan"].propensity()
    assert propensity is not None
    assert_propensity_equals_pooled(propensity, network["pooled"])


def test_cohort_counts_equal_the_generators_answer_key(network: dict[str, Any]) -> None:
    expected = network["truth"]["expected_cohort"]
    for site_id, site in network["plan"].sites.items():
        key = expected[site_id]
        for field in ("n_exposed", "n_comparator", "events_exposed", "events_comparator",
                      "person_days_exposed", "person_days_comparator"):
            assert site[field] == key[field], (site_id, field)
        steps = {step["step"]: step for step in site["attrition"]}
        assert steps["entry"]["n_persons"] == key["n_cud"]
        for rule in key["attrition"]:  # every count the site shows (small removals are suppressed)
            step = steps[rule["rule"]]
            for arm in ("exposed", "comparator"):
                assert step[f"n_{arm}"] in (None, rule[f"n_{arm}"]), (site_id, rule["rule"], arm)
        assert steps["time_at_risk"]["n_exposed"] == key["n_exposed"]


def test_crude_hr_is_biased_by_the_planted_confounding(network: dict[str, Any]) -> None:
    crude = network["plan"].analyses()["crude"]
    assert crude["ci_low"] > network["truth"]["hr_conditional"]


def test_exchanges_are_one_summary_plus_few_newton_rounds(network: dict[str, Any]) -> None:
    rounds = [e["round"] for e in network["transport"].exchanges]
    assert rounds[0] == "1-summary"
    assert 2 <= len(rounds) <= 6


def test_retried_round_gets_the_same_reply_bytes(network: dict[str, Any]) -> None:
    agent = network["agents"][0]
    request = StudyPlan(PROTOCOL).next_request()
    assert request is not None
    assert agent.handle(request.to_bytes()) == agent.handle(request.to_bytes())
