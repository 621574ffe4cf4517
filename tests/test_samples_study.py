"""The two OMOP samples in ../shared/data/omop, ingested and studied end to end (issue 4).

MIMIC-IV demo (CDM 5.3) is split by care site into its three largest care sites, three
lakes for three sites; Synthea27Nj (CDM 5.4) is one site. Each runs its plumbing protocol
from studies/samples/ through real Spark site agents (min_cell_count 1: the cohorts are a
handful of persons) and the coordinator's plan, in process (tests/inprocess.py).

The expected cohorts are an independent pandas reading of the same CSV files under
docs/cohort_rules.md (rules 1-7 and the age and sex covariates), never fedrwe's code:
the care-site split, every attrition step, the analysis rows, and for Synthea the crude
Cox model and the propensity model through statsmodels on those rows.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from coordinator.plan import StudyPlan
from coordinator.results import build_results, write_results
from flows.rounds import decode_replies
from shared.protocol.model import CodeSet, StudyProtocol, load_protocol
from site_agent.agent import SiteAgent
from site_agent.cohort.store import DatasetStore
from site_agent.data.delta import DeltaBackend, OmopTables
from site_agent.ingest import IngestResult, IngestSettings, ingest_omop
from site_agent.settings import ApprovalSettings, DisclosurePolicy, SiteSettings
from tests.inprocess import InProcessTransport
from tests.pooled_reference import assert_crude_equals_pooled, assert_propensity_equals_pooled
from tests.samples import SAMPLES

pytestmark = pytest.mark.integration

MIMIC = SAMPLES / "mimic_iv_demo" / "csv"
SYNTHEA = SAMPLES / "synthea27nj"
STUDIES = Path(__file__).resolve().parents[1] / "studies" / "samples"
TODAY = dt.date(2024, 1, 1)

# MIMIC's three largest home care sites and their persons (docs/ingest.md: 16 of its 31
# care sites are someone's home). Fourth place ties with CVICU at 11 persons
# (-2501038380264497908); like the split, the smaller id goes first.
MIMIC_SITES = {
    "neurology": (-6388176138378808864, 14),
    "emergency": (6888076371289519343, 12),
    "cvicu": (-4595469263819475121, 11),
}
STEPS = ("entry", "arm", "washout", "age", "no_prior_outcome", "time_at_risk")
PERSON_TABLES = ("person", "observation_period", "condition_occurrence", "drug_exposure", "drug_era", "death")


# --- the independent reading of the CSV files ------------------------------------------


def read_table(export: Path, table: str) -> pd.DataFrame:
    """One CDM table as text (any file-name case, MIMIC's ``2b_`` prefix), lower-case columns."""
    for path in export.iterdir():
        if re.fullmatch(rf"(\d+[a-z]_)?{table}\.csv", path.name.lower()):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False).rename(columns=str.lower)
            return frame.astype({"person_id": "int64"}) if "person_id" in frame else frame
    raise FileNotFoundError(f"no {table} file in {export}")


def home_care_sites(export: Path) -> pd.Series:
    """person_id -> care site: ``person.care_site_id``, else that of most of the person's
    visits, then of their visit details; ties go to the smaller id (docs/ingest.md)."""
    homes: list[pd.Series] = []
    for table in ("person", "visit_occurrence", "visit_detail"):
        rows = read_table(export, table)
        known = pd.concat(homes).index if homes else pd.Index([])
        rows = rows[(rows.care_site_id != "") & ~rows.person_id.isin(known)].astype({"care_site_id": "int64"})
        counts = rows.groupby(["person_id", "care_site_id"]).size().rename("n").reset_index()
        first = counts.sort_values(["person_id", "n", "care_site_id"], ascending=[True, False, True])
        homes.append(first.drop_duplicates("person_id").set_index("person_id").care_site_id)
    return pd.concat(homes)


def matches(codes: CodeSet, source: pd.Series, concept: pd.Series) -> pd.Series:
    """docs/cohort_rules.md: a trimmed source code (``X*`` a prefix) or a listed standard concept."""
    assert not codes.include_descendants  # neither sample has a concept_ancestor to expand
    code = source.str.strip()

    def any_of(patterns: list[str]) -> pd.Series:
        hit = pd.Series(False, index=source.index)
        for pattern in patterns:
            hit |= code.str.startswith(pattern[:-1]) if pattern.endswith("*") else code.eq(pattern)
        return hit

    concepts = set(codes.concept_ids) - set(codes.exclude_concept_ids)
    return (any_of(codes.include) & ~any_of(codes.exclude)) | concept.astype("int64").isin(concepts)


def dated(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame.assign(date=pd.to_datetime(frame[column]))


def arm_records(tables: dict[str, pd.DataFrame], domain: str) -> pd.DataFrame:
    """date, end, source value and concept of the arms' records (drug_era has no source value).
    Both samples fill every drug end date, so the days_supply fallback never applies."""
    if domain == "drug_era":
        eras = dated(tables["drug_era"], "drug_era_start_date")
        return eras.assign(end=pd.to_datetime(eras.drug_era_end_date), source="", concept=eras.drug_concept_id)
    drugs = dated(tables["drug_exposure"], "drug_exposure_start_date")
    assert (drugs.drug_exposure_end_date != "").all()
    return drugs.assign(end=pd.to_datetime(drugs.drug_exposure_end_date), source=drugs.drug_source_value,
                        concept=drugs.drug_concept_id)


@dataclass
class Expected:
    """One site's cohort by pandas: (persons, exposed, comparator) per step, and its rows."""

    attrition: dict[str, tuple[int, int | None, int | None]]
    rows: pd.DataFrame  # person_id, treatment, time, event, age, sex_female


def expected_cohort(protocol: StudyProtocol, tables: dict[str, pd.DataFrame]) -> Expected:
    """Rules 1-7 of docs/cohort_rules.md, plus the age and sex covariates of rule 8."""
    (domain,) = protocol.domains()  # both arms from one table
    population = protocol.study_population
    assert population.prior_outcome_lookback_days is None
    assert not population.restrict_to_common_period
    conditions = dated(tables["condition_occurrence"], "condition_start_date")

    def is_condition(codes: CodeSet) -> pd.Series:
        return matches(codes, conditions.condition_source_value, conditions.condition_concept_id)

    entry = conditions[is_condition(protocol.population.entry)].groupby("person_id").date.min()
    drugs = arm_records(tables, domain)
    after_entry = drugs.date >= drugs.person_id.map(entry)

    def first(records: pd.DataFrame) -> pd.DataFrame:
        """index_date, and cohort_end: the latest end among the records on the index date."""
        on_index = records[records.date == records.groupby("person_id").date.transform("min")]
        return on_index.groupby("person_id").agg(index_date=("date", "min"), cohort_end=("end", "max"))

    is_exposure = matches(protocol.exposure.codes, drugs.source, drugs.concept)
    exposed = first(drugs[is_exposure & after_entry])
    comparator = drugs[matches(protocol.comparator.codes, drugs.source, drugs.concept) & after_entry]
    ruled_out = drugs.person_id[is_exposure] if protocol.comparator.never_exposed else exposed.index
    comparator = first(comparator[~comparator.person_id.isin(ruled_out)])
    cohort = pd.concat([exposed.assign(treatment=1), comparator.assign(treatment=0)])
    cohort["cohort_end"] = cohort[["cohort_end", "index_date"]].max(axis=1)  # an end before the start
    tar = protocol.time_at_risk
    days_to_end = (cohort.cohort_end - cohort.index_date).dt.days
    cohort["risk_start"] = tar.start_day + (days_to_end if tar.start_anchor == "cohort_end" else 0)
    cohort["risk_end"] = tar.end_day + (days_to_end if tar.end_anchor == "cohort_end" else 0)
    attrition: dict[str, tuple[int, int | None, int | None]] = {"entry": (len(entry), None, None)}

    def keep(step: str, passed: pd.Series) -> None:
        nonlocal cohort
        cohort = cohort[passed]
        attrition[step] = (len(cohort), int((cohort.treatment == 1).sum()), int((cohort.treatment == 0).sum()))

    keep("arm", pd.Series(True, index=cohort.index))
    periods = tables["observation_period"].join(cohort.index_date, on="person_id", how="inner")
    start, end = (pd.to_datetime(periods[f"observation_period_{side}_date"]) for side in ("start", "end"))
    periods = periods.assign(obs_start=start, obs_end=end)[(start <= periods.index_date) & (periods.index_date <= end)]
    cohort = cohort.join(periods.groupby("person_id").agg(obs_start=("obs_start", "min"), obs_end=("obs_end", "max")))
    keep("washout", (cohort.index_date - cohort.obs_start).dt.days >= protocol.washout_days)
    person = tables["person"].set_index("person_id")
    cohort = cohort.assign(
        age=cohort.index_date.dt.year - cohort.index.map(person.year_of_birth).astype(int),
        sex_female=(cohort.index.map(person.gender_concept_id) == "8532").astype(int),  # female
    )
    keep("age", cohort.age >= protocol.population.min_age)
    outcomes = conditions[is_condition(protocol.outcome.codes)].join(
        cohort[["index_date", "risk_start"]], on="person_id", how="inner")
    day = (outcomes.date - outcomes.index_date).dt.days
    prior = outcomes.person_id[(outcomes.date < outcomes.index_date) | ((day >= 1) & (day < outcomes.risk_start))]
    keep("no_prior_outcome", pd.Series(not protocol.outcome.exclude_prior, index=cohort.index) | ~cohort.index.isin(prior))
    deaths = pd.to_datetime(tables["death"].death_date).groupby(tables["death"].person_id).min()
    death_date = pd.to_datetime(pd.Series(cohort.index.map(deaths), index=cohort.index))
    censor = pd.concat([
        cohort.risk_end.astype(float),
        (cohort.obs_end - cohort.index_date).dt.days,
        (death_date - cohort.index_date).dt.days if population.censor_at_death else cohort.risk_end,
    ], axis=1).min(axis=1)
    cohort = cohort.assign(censor=censor)
    keep("time_at_risk", cohort.censor - cohort.risk_start + 1 >= population.min_days_at_risk)
    at_risk = day >= outcomes.risk_start
    first_day = day[at_risk].groupby(outcomes.person_id[at_risk]).min()
    outcome_day = pd.Series(cohort.index.map(first_day), index=cohort.index, dtype=float)
    event = outcome_day.notna() & (outcome_day <= cohort.censor)
    time = outcome_day.where(event, cohort.censor) - cohort.risk_start + 1
    rows = cohort.assign(event=event.astype(int), time=time.astype(int))
    columns = ["person_id", "treatment", "time", "event", "age", "sex_female"]
    return Expected(attrition, rows.rename_axis("person_id").reset_index()[columns])


# --- the studies -----------------------------------------------------------------------


@dataclass
class SampleStudy:
    """One sample's study: the finished plan, every reply's status, and what pandas expects."""

    protocol: StudyProtocol
    plan: StudyPlan
    rounds: list[dict[str, Any]]
    replies: list[tuple[str, str, str, str | None]]  # round, site, status, error
    ingests: dict[str, IngestResult]
    datasets: dict[str, pd.DataFrame]
    expected: dict[str, Expected]


def run_sample_study(
    spark: SparkSession, root: Path, protocol: StudyProtocol, ingests: dict[str, IngestResult],
    expected: dict[str, Expected],
) -> SampleStudy:
    agents = [
        SiteAgent(
            SiteSettings(site_id=site, lake=Path(ingest.lake), workdir=root / site / "work",
                         policy=DisclosurePolicy(min_cell_count=1), approval=ApprovalSettings(mode="auto")),
            spark=spark,
        )
        for site, ingest in sorted(ingests.items())
    ]
    transport = InProcessTransport(agents)
    plan = StudyPlan(protocol)
    replies: list[tuple[str, str, str, str | None]] = []
    while (request := plan.next_request()) is not None:
        payload = request.to_bytes()
        answers = decode_replies(transport.exchange(request.round_name, dict.fromkeys(transport.node_ids(), payload), 60))
        replies += [(request.round_name, site, reply.status, reply.error) for site, reply in sorted(answers.items())]
        plan.absorb(answers)
    datasets = {
        agent.site_id: DeltaTable(str(agent.settings.workdir / "studies" / protocol.study_id / "analysis_dataset")).to_pandas()
        for agent in agents
    }
    return SampleStudy(protocol, plan, transport.exchanges, replies, ingests, datasets, expected)


def person_tables(export: Path, persons: pd.Index | None = None) -> dict[str, pd.DataFrame]:
    tables = {name: read_table(export, name) for name in PERSON_TABLES}
    return tables if persons is None else {name: t[t.person_id.isin(persons)] for name, t in tables.items()}


@pytest.fixture(scope="module")
def mimic(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    root = tmp_path_factory.mktemp("mimic")
    export = shutil.copytree(MIMIC, root / "export")
    protocol = load_protocol(STUDIES / "mimic_plumbing.yaml")
    home = home_care_sites(export)
    ingests, expected = {}, {}
    for site, (care_site_id, _) in MIMIC_SITES.items():
        settings = IngestSettings(omop=export, site_id=site, lake=root / site / "lake", care_site_id=care_site_id)
        ingests[site] = ingest_omop(settings, today=TODAY)
        expected[site] = expected_cohort(protocol, person_tables(export, home.index[home == care_site_id]))
    return run_sample_study(spark, root, protocol, ingests, expected)


@pytest.fixture(scope="module")
def synthea(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    root = tmp_path_factory.mktemp("synthea")
    export = shutil.copytree(SYNTHEA, root / "export")
    protocol = load_protocol(STUDIES / "synthea_plumbing.yaml")
    ingest = ingest_omop(IngestSettings(omop=export, site_id="synthea", lake=root / "synthea" / "lake"), today=TODAY)
    expected = {"synthea": expected_cohort(protocol, person_tables(export))}
    return run_sample_study(spark, root, protocol, {"synthea": ingest}, expected)


@pytest.fixture(params=["mimic", "synthea"])
def sample(request: pytest.FixtureRequest) -> SampleStudy:
    study: SampleStudy = request.getfixturevalue(request.param)
    return study


# --- the tests -------------------------------------------------------------------------


def test_both_samples_ingest_without_data_quality_errors(mimic: SampleStudy, synthea: SampleStudy) -> None:
    versions = {site: ingest.cdm_version for site, ingest in {**mimic.ingests, **synthea.ingests}.items()}
    assert {site: v[:3] for site, v in versions.items()} == {
        "neurology": "5.3", "emergency": "5.3", "cvicu": "5.3", "synthea": "5.4"}
    for ingest in (*mimic.ingests.values(), *synthea.ingests.values()):
        assert ingest.report.errors == (), ingest.site_id  # warnings only (docs/ingest.md)


def test_mimic_sites_are_its_three_largest_care_sites_disjoint(mimic: SampleStudy) -> None:
    home = home_care_sites(MIMIC)
    largest = sorted(home.value_counts().items(), key=lambda item: (-item[1], item[0]))[:3]
    assert largest == sorted(MIMIC_SITES.values(), key=lambda item: -item[1])
    seen: set[int] = set()
    for site, (care_site_id, n_persons) in MIMIC_SITES.items():
        persons = set(DeltaTable(mimic.ingests[site].lake + "/person").to_pandas().person_id)
        assert persons == set(home.index[home == care_site_id]), site
        assert len(persons) == n_persons
        assert not persons & seen
        seen |= persons


def test_every_site_replied_ok_in_every_round(sample: SampleStudy) -> None:
    assert sample.replies  # at least the summary round
    for round_name, site, status, error in sample.replies:
        assert (status, error) == ("ok", None), (round_name, site)
    for round_name in {r[0] for r in sample.replies}:
        assert {r[1] for r in sample.replies if r[0] == round_name} == set(sample.expected), round_name


def test_attrition_equals_pandas_on_the_csvs(sample: SampleStudy) -> None:
    for site, expected in sample.expected.items():
        steps = sample.plan.sites[site]["attrition"]
        assert [step["step"] for step in steps] == list(STEPS), site
        assert steps[0]["n_persons"] == expected.attrition["entry"][0] > 0, site  # persons with an entry condition
        for step in steps:
            assert (step["n_persons"], step["n_exposed"], step["n_comparator"]) == expected.attrition[step["step"]], (
                site, step["step"])
        rows = expected.rows
        for arm, treatment in (("exposed", 1), ("comparator", 0)):
            in_arm = rows[rows.treatment == treatment]
            assert sample.plan.sites[site][f"n_{arm}"] == len(in_arm), (site, arm)
            assert sample.plan.sites[site][f"events_{arm}"] == in_arm.event.sum(), (site, arm)
            assert sample.plan.sites[site][f"person_days_{arm}"] == in_arm.time.sum(), (site, arm)


def test_analysis_rows_equal_pandas_on_the_csvs(sample: SampleStudy) -> None:
    for site, expected in sample.expected.items():
        columns = list(expected.rows.columns)
        actual = sample.datasets[site][columns].astype(float).sort_values("person_id", ignore_index=True)
        wanted = expected.rows.astype(float).sort_values("person_id", ignore_index=True)
        pd.testing.assert_frame_equal(actual, wanted, check_dtype=False, obj=site)


def test_results_json_holds_each_sites_attrition_and_no_nan(sample: SampleStudy, tmp_path: Path) -> None:
    write_results(tmp_path / "results.json", build_results(sample.plan, sample.rounds))  # refuses NaN itself

    def no_constants(name: str) -> None:
        raise AssertionError(f"results.json holds {name}")

    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"), parse_constant=no_constants)
    assert [site["site_id"] for site in results["sites"]] == sorted(sample.expected)
    for site in results["sites"]:
        assert [step["step"] for step in site["attrition"]] == list(STEPS)
        assert all(step["n_persons"] is not None for step in site["attrition"])  # min_cell_count 1: nothing hidden
    assert results["study_id"] == sample.protocol.study_id


def test_mimic_crude_is_the_named_error_of_an_arm_without_events(mimic: SampleStudy) -> None:
    """One event, in the exposed arm (site emergency): no finite HR, and it says so."""
    crude = mimic.plan.analyses()["crude"]
    assert (crude["n_exposed"], crude["n_comparator"], crude["events_exposed"], crude["events_comparator"]) == (3, 5, 1, 0)
    assert "hr" not in crude
    assert crude["error"].startswith("no finite hazard ratio: the comparator arm has no events at any site.")
    assert [r["round"] for r in mimic.rounds] == ["1-summary"]  # nothing left to iterate


def test_synthea_crude_and_propensity_equal_statsmodels_on_the_pandas_rows(synthea: SampleStudy) -> None:
    rows = synthea.expected["synthea"].rows.assign(site_id="synthea")
    analyses = synthea.plan.analyses()
    assert analyses["crude"]["events_exposed"] > 0
    assert analyses["crude"]["events_comparator"] > 0
    assert_crude_equals_pooled(analyses["crude"], rows)
    propensity = synthea.plan.propensity()
    assert propensity is not None
    assert list(propensity["coefficients"]) == ["(intercept)", "age", "sex_female"]
    assert_propensity_equals_pooled(propensity, rows)


def test_mimic_drug_era_arms_at_risk_to_the_era_end_equal_pandas(
    mimic: SampleStudy, spark: SparkSession, tmp_path: Path
) -> None:
    """The MIMIC-IV demo's drug_era (by ingredient) as the arms, at risk from the day after
    index to the end of the index era: each site's cohort as pandas reads the CSV files."""
    data = mimic.protocol.model_dump(mode="json")
    data["exposure"] = {"name": "lisinopril or losartan", "domain": "drug_era",
                        "codes": {"concept_ids": [1308216, 1367500]}}  # RxNorm ingredients
    data["comparator"] = {"name": "amlodipine", "domain": "drug_era", "codes": {"concept_ids": [1332418]}}
    data["time_at_risk"] = {"start_day": 1, "end_day": 0, "end_anchor": "cohort_end"}
    data["risk_horizon_days"] = 30
    protocol = StudyProtocol.model_validate(data)
    home = home_care_sites(MIMIC)
    kept = 0
    for site, (care_site_id, _) in MIMIC_SITES.items():
        backend = DeltaBackend(spark, site)
        store = DatasetStore(backend, OmopTables(backend, Path(mimic.ingests[site].lake), site), tmp_path / site, site)
        dataset = store.get(protocol)
        expected = expected_cohort(protocol, person_tables(MIMIC, home.index[home == care_site_id]))
        assert {s.step: (s.n_persons, s.n_exposed, s.n_comparator) for s in dataset.attrition} == expected.attrition
        columns = list(expected.rows.columns)
        actual = dataset.frame.toPandas()[columns].astype(float).sort_values("person_id", ignore_index=True)
        wanted = expected.rows.astype(float).sort_values("person_id", ignore_index=True)
        pd.testing.assert_frame_equal(actual, wanted, check_dtype=False, obj=site)
        kept += len(wanted)
    assert kept > 0  # with a window ending on day 0 after index, nobody would be at risk
