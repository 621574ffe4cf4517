"""Large-scale covariates: the L2-penalised federated PS equals scikit-learn's pooled fit; the selection rule.

The federated fit runs through the coordinator's real plan and the sites' real partials
and disclosure guard (tests/rows_site.py), on one synthetic dataset with concept features
split over k = 1, 2, 3 sites. The reference is scikit-learn's ``LogisticRegression`` on the
pooled rows with the same columns: it minimises ``C * sum(log-loss) + ||w||^2 / 2`` with
the intercept unpenalised (solver ``newton-cholesky``), so ``C = 1 / propensity.l2``
(fedrwe maximises ``loglik - l2/2 * ||beta without intercept||^2``, shared/stats/logistic.py).
The Spark path (cohort build, features Delta table, site agent) is tested in
tests/test_large_scale_spark.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from coordinator.plan import StudyPlan
from shared.protocol.messages import RoundReply
from shared.protocol.model import StudyProtocol
from site_agent.analyses.large_scale import ConceptFeatures
from site_agent.settings import DisclosurePolicy
from tests.pooled_reference import RELATIVE_TOLERANCE
from tests.rows_site import RowsSite, rows_from_frame
from tests.test_adjusted_estimators import COVARIATES, make_rows, protocol

L2 = 2.0
MIN_CELL_COUNT = 5
SITE_SIZES = {1: [900], 2: [600, 300], 3: [450, 300, 150]}
SKLEARN_TOLERANCE = 1e-15  # newton-cholesky stops when max |gradient| is below this


def study(l2: float = L2, max_covariates: int = 1000, large_scale: bool = True) -> StudyProtocol:
    block = {"domains": ["condition", "drug"], "max_covariates": max_covariates}
    return protocol(propensity={"l2": l2}, **({"large_scale_covariates": block} if large_scale else {}))


def make_concepts(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Long-format (person_id, column) pairs: 30 concepts, some more common in one arm, 3 rare."""
    rng = np.random.default_rng(seed)
    treated = frame.treatment.to_numpy()
    pairs = []
    for j in range(30):
        column = f"{'drug' if j % 2 else 'condition'}_{4000 + j}"
        prevalence = 0.004 if j < 3 else 0.02 + 0.5 * rng.random()
        logit = np.log(prevalence / (1.0 - prevalence)) + rng.normal(0.0, 0.6) * treated
        has = rng.random(len(frame)) < 1.0 / (1.0 + np.exp(-logit))
        pairs.append(pd.DataFrame({"person_id": frame.person_id.to_numpy()[has], "column": column}))
    return pd.concat(pairs, ignore_index=True)


def split(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    sizes = SITE_SIZES[k]
    frame = frame.iloc[: sum(sizes)].copy()
    frame["site_id"] = np.repeat([f"site_{i}" for i in range(k)], sizes)
    return frame


def run(frame: pd.DataFrame, pairs: pd.DataFrame, protocol_: StudyProtocol,
        policy: DisclosurePolicy) -> tuple[StudyPlan, list[dict[str, RoundReply]]]:
    sites = []
    for site_id, rows in frame.groupby("site_id"):
        mine = pairs[pairs.person_id.isin(rows.person_id)]
        features = ConceptFeatures.from_columns(mine.person_id.to_numpy(), mine.column.tolist())
        sites.append(RowsSite(str(site_id), rows_from_frame(rows, COVARIATES), protocol_, policy, features))
    plan, replies = StudyPlan(protocol_), []
    while (request := plan.next_request()) is not None:
        replies.append({site.site_id: site.reply(request) for site in sites})
        plan.absorb(replies[-1])
    return plan, replies


def expected_selection(frame: pd.DataFrame, pairs: pd.DataFrame, max_covariates: int) -> list[str]:
    """The rule read literally: >= minimum with and without at every site; most persons first."""
    counts = pairs.merge(frame[["person_id", "site_id"]]).groupby(["site_id", "column"]).size().unstack(fill_value=0)
    sizes = frame.groupby("site_id").size()
    cleared = counts.apply(lambda c: (c >= MIN_CELL_COUNT) & (sizes[c.name] - c >= MIN_CELL_COUNT), axis=1)
    common = cleared.columns[cleared.all(axis=0)]
    totals = counts[common].sum(axis=0)
    return sorted(common, key=lambda column: (-totals[column], column))[:max_covariates]


def pooled_design(frame: pd.DataFrame, pairs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    indicators = pd.crosstab(pairs.person_id, pairs.column).clip(upper=1)
    wide = frame.set_index("person_id").join(indicators, how="left").fillna(dict.fromkeys(indicators.columns, 0))
    return wide[columns].astype(float)


def sklearn_fit(design: pd.DataFrame, treatment: np.ndarray, l2: float) -> np.ndarray:
    fit = LogisticRegression(C=1.0 / l2, solver="newton-cholesky", tol=SKLEARN_TOLERANCE, max_iter=200)
    fit.fit(design.to_numpy(), treatment)
    return np.r_[fit.intercept_, fit.coef_[0]]


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = make_rows(900, whole_days=True, seed=41)
    return frame, make_concepts(frame, seed=42)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_federated_l2_propensity_equals_sklearn_on_the_pooled_rows(data: tuple[pd.DataFrame, pd.DataFrame], k: int) -> None:
    frame, pairs = split(data[0], k), data[1]
    plan, _ = run(frame, pairs, study(), DisclosurePolicy(min_cell_count=MIN_CELL_COUNT))
    result = plan.propensity()
    assert result is not None
    selected = result["large_scale_covariates"]["columns"]
    assert selected == expected_selection(frame, pairs, 1000)
    assert 10 < len(selected) < 30  # the rule kept some concepts and dropped others
    names = list(result["coefficients"])
    assert names == ["(intercept)", *COVARIATES, *selected]
    design = pooled_design(frame, pairs, names[1:])
    reference = sklearn_fit(design, frame.set_index("person_id").treatment.to_numpy(), L2)
    federated = np.array(list(result["coefficients"].values()))
    np.testing.assert_allclose(federated, reference, rtol=RELATIVE_TOLERANCE, atol=0.0)
    x = np.column_stack([np.ones(len(design)), design.to_numpy()])  # SEs: inverse penalised information
    p = 1.0 / (1.0 + np.exp(-x @ reference))
    information = (x * (p * (1 - p))[:, None]).T @ x + np.diag([0.0, *[L2] * (x.shape[1] - 1)])
    np.testing.assert_allclose(list(result["standard_errors"].values()), np.sqrt(np.diag(np.linalg.inv(information))),
                               rtol=1e-7)


def test_balance_reports_the_concepts_apart_and_the_analyses_run(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """Without a penalty, overlap weights balance every model column exactly: the concepts' too."""
    frame, pairs = split(data[0], 3), data[1]
    plan, _ = run(frame, pairs, study(l2=0.0), DisclosurePolicy(min_cell_count=MIN_CELL_COUNT))
    balance = plan.extras()["balance"]
    concepts = plan.propensity()["large_scale_covariates"]["columns"]
    assert set(balance["covariates"]) == set(COVARIATES)  # the named table stays as it was
    block = balance["large_scale"]
    assert block["n_covariates"] == len(concepts)
    assert set(block["max_abs_smd"]) == {"before", "matched", "iptw_ate", "iptw_att", "overlap"}
    assert block["max_abs_smd"]["overlap"] < 1e-9 < block["max_abs_smd"]["before"]
    design = pooled_design(frame, pairs, concepts)
    t = frame.set_index("person_id").treatment.to_numpy() == 1
    means = design[t].mean(), design[~t].mean()
    smd = (means[0] - means[1]) / np.sqrt((design[t].var(ddof=0) + design[~t].var(ddof=0)) / 2)
    assert block["max_abs_smd"]["before"] == pytest.approx(float(smd.abs().max()), rel=1e-12)
    assert all("hr" in plan.analyses()[name] for name in ("matched", "iptw_ate", "iptw_att", "overlap"))


def test_the_model_starts_one_exchange_later_than_without_concepts(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    frame, pairs = split(data[0], 3), data[1]
    policy = DisclosurePolicy(min_cell_count=MIN_CELL_COUNT)
    plan, with_concepts = run(frame, pairs, study(), policy)
    plain, without = run(frame, pairs, study(large_scale=False), policy)
    newton = plan.propensity()["newton_rounds"], plain.propensity()["newton_rounds"]
    assert len(with_concepts) - newton[0] == len(without) - newton[1] + 1  # the start; more columns may need a Newton round more
    assert (len(with_concepts), len(without)) == (7, 5)
    summary = next(iter(with_concepts[0].values())).results
    assert "propensity" not in summary
    assert "large_scale_concepts" in summary


def test_max_covariates_keeps_the_most_common_concepts(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    frame, pairs = split(data[0], 2), data[1]
    plan, _ = run(frame, pairs, study(max_covariates=4), DisclosurePolicy(min_cell_count=MIN_CELL_COUNT))
    assert plan.propensity()["large_scale_covariates"]["columns"] == expected_selection(frame, pairs, 4)


def rare_at_one_site(data: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """drug_9001: common at sites 0 and 1, 3 persons at site 2; drug_9002: all but 2 persons of site 1."""
    frame, pairs = split(data[0], 3), data[1]
    by_site = {site: rows.person_id.to_numpy() for site, rows in frame.groupby("site_id")}
    rare = np.r_[by_site["site_0"][:60], by_site["site_1"][:40], by_site["site_2"][:3]]
    near_universal = np.r_[by_site["site_0"][:200], by_site["site_1"][2:], by_site["site_2"][:70]]
    extra = pd.concat([pd.DataFrame({"person_id": rare, "column": "drug_9001"}),
                       pd.DataFrame({"person_id": near_universal, "column": "drug_9002"})])
    return frame, pd.concat([pairs, extra], ignore_index=True)


def _released(reply: RoundReply) -> dict[str, Any]:
    persons: dict[str, Any] = reply.results["large_scale_concepts"]["persons"]
    return persons


def test_a_concept_below_the_minimum_at_one_site_stays_out_and_is_never_released(
    data: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    frame, pairs = rare_at_one_site(data)
    plan, replies = run(frame, pairs, study(), DisclosurePolicy(min_cell_count=MIN_CELL_COUNT))
    columns = plan.propensity()["large_scale_covariates"]["columns"]
    assert "drug_9001" not in columns
    assert "drug_9002" not in columns
    summary = replies[0]
    sizes = frame.groupby("site_id").size()
    for site_id, reply in summary.items():
        for column, count in _released(reply).items():  # every released count and its complement clear the minimum
            assert MIN_CELL_COUNT <= count <= sizes[site_id] - MIN_CELL_COUNT, (site_id, column)
    assert "drug_9001" in _released(summary["site_0"])
    assert "drug_9001" not in _released(summary["site_2"])
    assert "drug_9002" in _released(summary["site_0"])
    assert "drug_9002" not in _released(summary["site_1"])
    later = {site: [r.model_dump_json() for round_ in replies[1:] for s, r in round_.items() if s == site]
             for site in summary}
    assert all("drug_9001" not in text for text in later["site_2"])


def test_a_site_refuses_to_evaluate_a_concept_it_did_not_release(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    frame, pairs = rare_at_one_site(data)
    protocol_ = study()
    plan, _ = run(frame, pairs, protocol_, DisclosurePolicy(min_cell_count=MIN_CELL_COUNT))
    site_rows = frame[frame.site_id == "site_2"]
    mine = pairs[pairs.person_id.isin(site_rows.person_id)]
    site = RowsSite("site_2", rows_from_frame(site_rows, COVARIATES), protocol_,
                    DisclosurePolicy(min_cell_count=MIN_CELL_COUNT),
                    ConceptFeatures.from_columns(mine.person_id.to_numpy(), mine.column.tolist()))
    request = plan._request("newton", {"propensity": {"beta": [0.0] * 5, "concepts": ["drug_9001"], "local_fit": True}})
    reply = site.reply(request)
    assert reply.status == "ok"
    withheld = reply.results["propensity"]["withheld"]
    assert "drug_9001" in withheld
    assert "minimum cell count 5" in withheld
    assert "gradient" not in reply.results["propensity"]
