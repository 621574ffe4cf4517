"""Several comparisons in one protocol: the reference study's comparisons A and B.

The protocol studies/ketamine_cud_reference.yaml holds comparison A (ketamine vs other
anaesthetics) and B (in CUD patients with depression: ketamine vs antidepressants, and vs
midazolam). Each comparison runs its own rounds against the same sites; requests carry the
whole protocol and name the comparison. Each comparison's federated estimates equal the
pooled analysis of that comparison's rows (independent libraries, tests/pooled_reference).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from deltalake import DeltaTable
from prefect.settings import PREFECT_API_URL, temporary_settings
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from coordinator.report import render_report
from coordinator.results import comparison_results, comparison_views, study_results
from flows.rounds import decode_replies
from flows.study import study_flow
from shared.errors import ProtocolError
from shared.protocol.messages import RoundReply
from shared.protocol.model import Quorum, StudyProtocol, load_protocol, parse_protocol
from shared.synthetic import generate_network
from site_agent.agent import SiteAgent
from site_agent.cohort.store import DatasetStore
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.inprocess import InProcessTransport
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled
from tests.test_cohort_rules import PROTOCOL as ONE_COMPARISON

STUDIES = Path(__file__).parents[1] / "studies"
REFERENCE = load_protocol(STUDIES / "ketamine_cud_reference.yaml")
COMPARISONS = ["vs_anaesthetics", "vs_antidepressants", "vs_midazolam"]


def _with(changes: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    data = REFERENCE.model_dump(mode="json")
    for key in drop:
        data.pop(key)
    return {**data, **changes}


# --- the protocol ------------------------------------------------------------------------

def test_resolving_a_comparison_gives_its_arms_restriction_and_covariates() -> None:
    assert REFERENCE.comparison_ids() == COMPARISONS
    b1 = REFERENCE.resolve("vs_antidepressants")
    assert b1.study_id == "ketamine_cud_reference__vs_antidepressants"
    assert b1.arms()[1].name == "antidepressants"
    assert b1.restrict_to is not None
    assert b1.restrict_to.name == "depression"
    assert "depression" not in b1.covariate_columns()
    assert b1.outcome == REFERENCE.outcome
    a = REFERENCE.resolve("vs_anaesthetics")
    assert a.restrict_to is None
    assert "depression" in a.covariate_columns()
    assert a.comparisons == []
    assert REFERENCE.sha256() != a.sha256()


def test_a_one_comparison_protocol_resolves_to_itself() -> None:
    assert ONE_COMPARISON.comparison_ids() == [None]
    assert ONE_COMPARISON.resolve(None) is ONE_COMPARISON


@pytest.mark.parametrize(
    ("changes", "drop", "message"),
    [
        ({"exposure": {"name": "k", "codes": {"concept_ids": [1]}}}, (), "either `exposure` and `comparator` or `comparisons`"),
        ({}, ("comparisons",), "missing exposure and comparator"),
        ({"comparisons": [REFERENCE.comparisons[0].model_dump(mode="json")] * 2}, (), "repeat"),
        ({"comparisons": [{**REFERENCE.comparisons[1].model_dump(mode="json"), "exclude_covariates": ["mood"]}]},
         (), r"exclude_covariates \['mood'\] are not covariates"),
        ({"comparisons": [{**REFERENCE.comparisons[0].model_dump(mode="json"), "id": "A"}]}, (), r"comparisons\.0\.id"),
    ],
)
def test_bad_comparisons_are_named(changes: dict[str, Any], drop: tuple[str, ...], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_protocol(_with(changes, drop))


def test_a_request_must_name_an_existing_comparison() -> None:
    with pytest.raises(ProtocolError, match=r"has comparisons .*must name one"):
        REFERENCE.resolve(None)
    with pytest.raises(ProtocolError, match=r"no comparison 'vs_placebo'.*vs_anaesthetics"):
        REFERENCE.resolve("vs_placebo")


def test_requests_carry_the_whole_protocol_and_name_the_comparison() -> None:
    request = StudyPlan(REFERENCE, "vs_midazolam").next_request()
    assert request is not None
    assert request.study_id == REFERENCE.study_id
    assert request.protocol_sha256 == REFERENCE.sha256()
    assert request.comparison == "vs_midazolam"
    assert request.round_name == "vs_midazolam/1-summary"


# --- the restriction on a hand-built site (tests/test_cohort_rules.py's persons) ------------

@pytest.mark.parametrize(
    ("window", "expected", "step"),
    [
        # Depression on or before index: 11 (F32.9 31 days before) and 2 (on its index day).
        # Among the 9 persons with an arm (4 exposed, 5 comparator) they are 1 exposed, 1 comparator.
        ({"start_day": -36500, "end_day": 0}, [2, 11], (2, 1, 1)),
        # Only within 30 days before index: 11's record (day -31) is outside, 2's is inside.
        ({"start_day": -30, "end_day": 0}, [2], (1, 0, 1)),
    ],
)
def test_restriction_keeps_persons_with_the_condition_in_its_window(
    spark: SparkSession, tmp_path: Path, window: dict[str, int], expected: list[int], step: tuple[int, int, int]
) -> None:
    from site_agent.data.delta import DeltaBackend, OmopTables
    from tests.test_cohort_rules import hand_built_site

    site = hand_built_site()
    site.condition(2, "F32.9", "2016-06-01")  # person 2's index day
    site.write(tmp_path / "lake")
    data = ONE_COMPARISON.model_dump(mode="json")
    data["restrict_to"] = {"name": "depression", "codes": {"vocabulary": "ICD10CM", "include": ["F32.*"]},
                           "window": window}
    backend = DeltaBackend(spark, "site_r")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_r"), tmp_path / "work", "site_r")
    dataset = store.get(StudyProtocol.model_validate(data))
    assert sorted(r["person_id"] for r in dataset.frame.collect()) == expected
    steps = {s.step: (s.n_persons, s.n_exposed, s.n_comparator) for s in dataset.attrition}
    assert list(steps)[:3] == ["entry", "arm", "restriction"]
    assert steps["restriction"] == step
    assert steps["time_at_risk"] == step  # both pass every later rule (see test_cohort_rules)


# --- the whole reference protocol on the synthetic network ---------------------------------

@pytest.fixture(scope="module")
def network(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reference")
    generate_network(root / "data", n_sites=3, n_patients=8_000, seed=5)
    # B2 (ketamine vs midazolam among patients with depression) has a handful of comparator
    # events per site at this size: the sites' policy allows counts from 1 (B1 needs ~10,000
    # patients, B2 ~30,000 for the default 10).
    policy = DisclosurePolicy(min_cell_count=1)
    agents = [
        SiteAgent(SiteSettings(site_id=site.name, lake=site / "lake", workdir=root / "work" / site.name,
                               policy=policy, approval=ApprovalSettings(mode="auto")), spark=spark)
        for site in sorted((root / "data" / "sites").iterdir())
    ]
    transport = InProcessTransport(agents)
    plans, outcomes = {}, []
    for comparison in REFERENCE.comparison_ids():
        plan = StudyPlan(REFERENCE, comparison, run_id="0" * 32)
        while (request := plan.next_request()) is not None:
            payload = request.to_bytes()
            plan.absorb(decode_replies(transport.exchange(request.round_name, dict.fromkeys(transport.node_ids(), payload), 60)))
        plans[comparison] = plan
        outcomes.append((comparison, comparison_results(plan, [])))
    return {"plans": plans, "agents": agents, "transport": transport,
            "results": study_results(REFERENCE, "0" * 32, outcomes),
            "truth": json.loads((root / "data" / "truth.json").read_text())}


def _pooled(network: dict[str, Any], comparison: str) -> pd.DataFrame:
    study_id = REFERENCE.resolve(comparison).study_id
    return pd.concat(
        DeltaTable(str(agent.settings.workdir / "studies" / study_id / "analysis_dataset")).to_pandas()
        for agent in network["agents"]
    )


@pytest.mark.parametrize("comparison", COMPARISONS)
def test_each_comparison_equals_its_pooled_analysis(network: dict[str, Any], comparison: str) -> None:
    plan, pooled = network["plans"][comparison], _pooled(network, comparison)
    assert_crude_equals_pooled(plan.analyses()["crude"], pooled)
    propensity = plan.propensity()
    assert propensity is not None
    assert_propensity_equals_pooled(propensity, pooled)
    assert "hr" in plan.analyses()["matched"]


def test_comparison_b_keeps_only_patients_with_depression(network: dict[str, Any]) -> None:
    for comparison in ("vs_antidepressants", "vs_midazolam"):
        sites = network["plans"][comparison].sites.values()
        for site in sites:
            steps = [step["step"] for step in site["attrition"]]
            assert steps[:3] == ["entry", "arm", "restriction"]
        b = sum(site["n_exposed"] for site in sites)
        a = sum(site["n_exposed"] for site in network["plans"]["vs_anaesthetics"].sites.values())
        assert 0 < b < a  # ketamine patients with depression are a subset of all ketamine patients
    assert "depression" not in network["plans"]["vs_midazolam"].propensity()["coefficients"]


def test_comparison_b1_counts_equal_the_generators_answer_key(network: dict[str, Any]) -> None:
    """The generator plants B1 (antidepressant starters) and works out its cohort per site."""
    key = network["truth"]["comparisons"]["vs_antidepressants"]["expected_cohort"]
    for site_id, site in network["plans"]["vs_antidepressants"].sites.items():
        expected = key[site_id]
        for field in ("n_exposed", "n_comparator", "events_exposed", "events_comparator",
                      "person_days_exposed", "person_days_comparator"):
            assert site[field] == expected[field], (site_id, field)
        steps = {step["step"]: step for step in site["attrition"]}
        assert steps["entry"]["n_persons"] == expected["n_cud"]
        for rule in expected["attrition"]:
            for arm in ("exposed", "comparator"):
                assert steps[rule["rule"]][f"n_{arm}"] == rule[f"n_{arm}"], (site_id, rule["rule"], arm)


def test_comparison_b1_recovers_its_planted_effect_while_the_crude_is_biased(network: dict[str, Any]) -> None:
    truth = network["truth"]["comparisons"]["vs_antidepressants"]["hr_conditional"]
    analyses = network["plans"]["vs_antidepressants"].analyses()
    for name in ("matched", "iptw_ate", "overlap"):
        assert analyses[name]["ci_low"] <= truth <= analyses[name]["ci_high"], name
    assert analyses["crude"]["hr"] > analyses["matched"]["hr"]


def test_every_comparison_has_its_own_rounds_and_datasets(network: dict[str, Any]) -> None:
    rounds = [e["round"] for e in network["transport"].exchanges]
    for comparison in COMPARISONS:
        own = [r for r in rounds if r.startswith(f"{comparison}/")]
        assert [r.split("-")[0] for r in own] == [f"{comparison}/{i}" for i in range(1, len(own) + 1)]
        assert own[0] == f"{comparison}/1-summary"
        assert own[-1].endswith("-adjusted")
    assert len(rounds) == sum(1 for r in rounds if r.split("/")[0] in COMPARISONS)
    work = network["agents"][0].settings.workdir / "studies"
    assert {p.name for p in work.iterdir()} >= {f"ketamine_cud_reference__{c}" for c in COMPARISONS}


def test_results_and_report_list_every_comparison(network: dict[str, Any]) -> None:
    results = network["results"]
    assert results["protocol_sha256"] == REFERENCE.sha256()
    assert [c["comparison_id"] for c in results["comparisons"]] == COMPARISONS
    views = comparison_views(results)
    assert [v["study_id"] for v in views] == [REFERENCE.study_id] * 3
    html = render_report(results, network["truth"])
    assert "conditional HR (planted), comparison vs_antidepressants" in html
    for comparison in COMPARISONS:
        assert f"<code>{comparison}</code>" in html
    hr = results["comparisons"][2]["analyses"]["matched"]["hr"]
    assert f"{hr:.2f}" in html


class _OneSiteFailsOneComparison(InProcessTransport):
    """The first site answers every request of ``vs_midazolam`` with an error reply."""

    def exchange(self, round_name: str, payloads: Mapping[int, bytes], timeout_s: float) -> dict[int, bytes]:
        replies = super().exchange(round_name, payloads, timeout_s)
        if round_name.startswith("vs_midazolam/"):
            first = min(replies)
            replies[first] = RoundReply(status="error", site_id=f"site_0{first - 100}",
                                        error="disk full. Fix: free space").to_bytes()
        return replies


def test_a_site_that_errs_in_one_comparison_is_left_out_of_it_only(
    network: dict[str, Any], prefect_api_url: str, tmp_path: Path
) -> None:
    """site_01 answers vs_midazolam's first round with an error: that comparison goes on with
    site_02 and site_03 (the default quorum is one site) and says so; the others keep site_01."""
    transport = _OneSiteFailsOneComparison(network["agents"])
    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
        study_flow(transport, REFERENCE, str(tmp_path), 60.0)
    results = json.loads((tmp_path / "results.json").read_text())
    by_id = {c["comparison_id"]: c for c in results["comparisons"]}
    assert all("error" not in c for c in by_id.values())
    assert by_id["vs_anaesthetics"]["participation"] == {
        "sites": ["site_01", "site_02", "site_03"], "attempts": 1, "dropped": [],
        "note": "every analysis of this comparison uses exactly these sites"}
    midazolam = by_id["vs_midazolam"]
    assert midazolam["participation"]["sites"] == ["site_02", "site_03"]
    assert midazolam["participation"]["dropped"] == [{
        "site_id": "site_01", "comparison": "vs_midazolam", "round_name": "vs_midazolam/1-summary",
        "status": "error", "reason": "disk full. Fix: free space"}]
    # its counts are exactly the two remaining sites' counts
    full = network["plans"]["vs_midazolam"].sites
    assert [s["site_id"] for s in midazolam["sites"]] == ["site_02", "site_03"]
    for arm in ("exposed", "comparator"):
        assert midazolam["analyses"]["crude"][f"n_{arm}"] == full["site_02"][f"n_{arm}"] + full["site_03"][f"n_{arm}"]
    # the comparisons that ran on every site equal the ones run without the flow
    for comparison in ("vs_anaesthetics", "vs_antidepressants"):
        assert by_id[comparison]["analyses"]["matched"]["hr"] == network["plans"][comparison].analyses()["matched"]["hr"]


def test_a_required_site_that_errs_fails_its_comparison_and_names_the_quorum(
    network: dict[str, Any], prefect_api_url: str, tmp_path: Path
) -> None:
    strict = REFERENCE.model_copy(update={"quorum": Quorum(required_sites=["site_01"])})
    transport = _OneSiteFailsOneComparison(network["agents"])
    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
        study_flow(transport, strict, str(tmp_path), 60.0)
    results = json.loads((tmp_path / "results.json").read_text())
    failed = {c["comparison_id"]: c.get("error") for c in results["comparisons"]}
    assert failed["vs_anaesthetics"] is None
    assert failed["vs_midazolam"].startswith("InsufficientSites: comparison 'vs_midazolam'")
    assert "required site(s) ['site_01'] are not among them" in failed["vs_midazolam"]
    assert "site_01 at vs_midazolam/1-summary (error: disk full. Fix: free space)" in failed["vs_midazolam"]
    assert "Fix: bring the dropped sites back" in failed["vs_midazolam"]
    assert "This comparison has no results" in (tmp_path / "report.html").read_text()
