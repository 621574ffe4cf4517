"""Large-scale covariates through the real site path: Spark cohort build, features Delta table, site agents.

* On a hand-built site (answers worked out by hand): which (person, concept) pairs become
  features, and which records are excluded (the arms' drugs, named covariates' codes,
  concept 0, records outside the window).
* On the synthetic network (3 sites, real Spark and Delta, in-process transport): the
  federated L2 propensity model equals scikit-learn's pooled fit on every site's analysis
  rows joined with its features table, the selection follows the rule, every site's summary
  reply releases only counts at or above its minimum (with and without the concept), and
  the arms' drugs are not covariates although exposed persons took them before index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from flows.rounds import decode_replies
from shared.omop import LOCAL_CONCEPT_START
from shared.protocol.messages import decode_reply
from shared.protocol.model import StudyProtocol, load_protocol
from shared.synthetic import generate_network
from shared.synthetic.vocabulary import COMPARATOR_DRUGS, KETAMINE, SOURCE_CODES
from site_agent.agent import SiteAgent
from site_agent.cohort.store import DatasetStore
from site_agent.data.delta import DeltaBackend, OmopTables
from site_agent.settings import ApprovalSettings, SiteSettings
from tests.inprocess import InProcessTransport
from tests.pooled_reference import RELATIVE_TOLERANCE
from tests.test_cohort_rules import KETAMINE as KETAMINE_CODE
from tests.test_cohort_rules import PROPOFOL, hand_built_site
from tests.test_large_scale_covariates import SKLEARN_TOLERANCE, sklearn_fit

BASE = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")
L2 = 1.0
MIN_CELL_COUNT = 10  # the sites' default policy


def with_large_scale(protocol: StudyProtocol, **block: Any) -> StudyProtocol:
    data = protocol.model_dump(mode="json")
    data["large_scale_covariates"] = {"domains": ["condition", "drug"], **block}
    data["propensity"] = {"l2": L2}
    return StudyProtocol.model_validate(data)


STUDY = with_large_scale(BASE)
K, P, F, H, D = 7001, 7002, 7003, 7004, 7005  # ketamine, propofol, fentanyl, hypertension, depression


def test_features_follow_the_window_and_exclude_the_arms_and_named_covariates(spark: SparkSession, tmp_path: Path) -> None:
    b = hand_built_site()
    b.drug(1, "4337", "2015-06-01", concept=F)  # fentanyl in the window: a feature
    b.drug(1, "4337", "2016-01-01", concept=F)  # (and on the index day: outside, same concept)
    b.condition(1, "E11.9", "2015-06-01")  # concept 0: no feature
    b.drug(2, "4337", "2016-01-01", concept=F)  # comparator 2 (index 2016-06-01): a feature
    b.drug(12, PROPOFOL, "2016-06-01", concept=P)  # the comparator's drug before exposed 12's index
    b.drug(10, "PROPOFOL 10MG", "2015-06-01", concept=P)  # the same concept, under a source code the set lacks
    b.condition(11, "I10", "2015-10-01", concept=H)  # hypertension in the window: a feature
    b.condition(11, "I10", "2014-01-01", concept=H)  # and outside it
    b.condition(11, "F32.9", "2015-12-02", concept=D)  # a named covariate's code (depression)
    b.person(13)  # exposed; ketamine before entry, inside the window before index
    b.drug(13, KETAMINE_CODE, "2015-08-01", concept=K)
    b.condition(13, "F14.20", "2015-09-01")
    b.drug(13, KETAMINE_CODE, "2016-01-01", concept=K)
    b.write(tmp_path / "lake")
    backend = DeltaBackend(spark, "site_f")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_f"), tmp_path / "work", "site_f")
    dataset = store.get(STUDY)
    assert sorted(r["person_id"] for r in dataset.frame.select("person_id").collect()) == [1, 2, 10, 11, 12, 13]
    assert dataset.features is not None
    pairs = {(r["person_id"], r["domain"], r["concept_id"]) for r in dataset.features.collect()}
    assert pairs == {(1, "drug", F), (2, "drug", F), (11, "condition", H)}
    assert DeltaTable(str(store.features_path(STUDY.study_id))).to_pandas().shape == (3, 3)
    reopened = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_f"), tmp_path / "work", "site_f")
    cached = reopened.get(STUDY)  # after a restart: dataset and features from their Delta tables
    assert not cached.rebuilt
    assert cached.features is not None
    assert cached.features.count() == 3


@pytest.fixture(scope="module")
def network(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("network")
    generate_network(root / "data", n_sites=3, n_patients=8_000, seed=11)  # as test_study_federated
    agents = [
        SiteAgent(SiteSettings(site_id=site.name, lake=site / "lake", workdir=root / "work" / site.name,
                               approval=ApprovalSettings(mode="auto")), spark=spark)
        for site in sorted((root / "data" / "sites").iterdir())
    ]
    transport = InProcessTransport(agents)
    plan = StudyPlan(STUDY)
    while (request := plan.next_request()) is not None:
        payload = request.to_bytes()
        plan.absorb(decode_replies(transport.exchange(request.round_name, dict.fromkeys(transport.node_ids(), payload), 60)))
    study_dir = {a.settings.site_id: a.settings.workdir / "studies" / STUDY.study_id for a in agents}
    rows = pd.concat(DeltaTable(str(d / "analysis_dataset")).to_pandas() for d in study_dir.values())
    features = pd.concat(
        DeltaTable(str(d / "large_scale_features")).to_pandas().assign(site_id=site) for site, d in study_dir.items()
    )
    features["column"] = features.domain + "_" + features.concept_id.astype(str)
    return {"plan": plan, "rows": rows, "features": features, "agents": agents, "transport": transport, "root": root}


def test_federated_l2_propensity_equals_sklearn_on_the_pooled_spark_rows(network: dict[str, Any]) -> None:
    result = network["plan"].propensity()
    names = list(result["coefficients"])
    concepts = result["large_scale_covariates"]["columns"]
    assert names == ["(intercept)", *BASE.covariate_columns(), *concepts]
    assert len(concepts) >= 5
    rows, features = network["rows"], network["features"]
    indicators = pd.crosstab(features.person_id, features.column).clip(upper=1)
    design = rows.set_index("person_id").join(indicators[concepts], how="left").fillna(0.0)[names[1:]].astype(float)
    reference = sklearn_fit(design, rows.set_index("person_id").treatment.to_numpy(), L2)
    np.testing.assert_allclose(list(result["coefficients"].values()), reference, rtol=RELATIVE_TOLERANCE, atol=0.0)
    assert SKLEARN_TOLERANCE < 1e-12
    assert len(network["transport"].exchanges) <= 8


def test_the_selection_and_every_released_count_follow_the_rule(network: dict[str, Any]) -> None:
    rows, features = network["rows"], network["features"]
    sizes = rows.groupby("site_id").size()
    counts = features.groupby(["site_id", "column"]).size().unstack(fill_value=0)
    cleared = counts.apply(lambda c: (c >= MIN_CELL_COUNT) & (sizes[c.name] - c >= MIN_CELL_COUNT), axis=1)
    common = cleared.columns[cleared.all(axis=0)]
    expected = sorted(common, key=lambda column: (-counts[column].sum(), column))
    assert network["plan"].propensity()["large_scale_covariates"]["columns"] == expected
    assert len(common) < len(counts.columns)  # some concepts were too rare somewhere
    summary = StudyPlan(STUDY, run_id=network["plan"].run_id).next_request()
    assert summary is not None
    for agent in network["agents"]:
        site = agent.settings.site_id
        released = decode_reply(agent.handle(summary.to_bytes())).results["large_scale_concepts"]["persons"]
        assert released == {c: int(n) for c, n in counts.loc[site].items() if cleared.loc[site, c]}
        assert all(MIN_CELL_COUNT <= n <= sizes[site] - MIN_CELL_COUNT for n in released.values())


def test_the_arms_drugs_are_not_covariates_though_taken_in_the_window(network: dict[str, Any]) -> None:
    position = {code.code: i for i, code in enumerate(SOURCE_CODES)}
    arm_concepts = {LOCAL_CONCEPT_START + position[code.code] for code in (KETAMINE, *COMPARATOR_DRUGS)}
    assert not arm_concepts & set(network["features"].concept_id)
    rows = network["rows"]
    drugs = pd.concat(
        DeltaTable(str(network["root"] / "data" / "sites" / site / "lake" / "drug_exposure")).to_pandas(
            columns=["person_id", "drug_exposure_start_date", "drug_concept_id"])
        for site in rows.site_id.unique()
    ).merge(rows[["person_id", "index_date", "treatment"]])
    offset = (pd.to_datetime(drugs.drug_exposure_start_date) - pd.to_datetime(drugs.index_date)).dt.days
    taken = drugs[(offset >= -365) & (offset <= -1) & drugs.drug_concept_id.isin(arm_concepts)]
    assert (taken.treatment == 1).sum() > 0  # without the exclusion these would separate the arms
