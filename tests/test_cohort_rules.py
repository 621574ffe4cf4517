"""The cohort rules of docs/cohort_rules.md on a hand-built OMOP site, answers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from shared.errors import DataError, DataQualityError, MissingTableError, UnmatchedConceptSetError
from shared.omop import GENDER_FEMALE, RACE_BLACK, STUDY_TABLES, VISIT_EMERGENCY
from shared.protocol.model import StudyProtocol, load_protocol
from site_agent.cohort.store import DatasetStore
from site_agent.data.delta import DeltaBackend, OmopTables
from tests.omop_builder import OmopBuilder, d

PROTOCOL = load_protocol(Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml")
KETAMINE, PROPOFOL, MIDAZOLAM = "6130", "8782", "6960"


def hand_built_site() -> OmopBuilder:
    b = OmopBuilder()
    # 1: exposed, remission on day 60.
    b.person(1, gender=GENDER_FEMALE, race=RACE_BLACK)
    b.condition(1, "F14.20", "2015-01-01")
    b.drug(1, KETAMINE, "2016-01-01")
    b.condition(1, "F14.21", "2016-03-01")
    # 2: comparator, censored at the end of observation (day 61).
    b.person(2, obs=("2010-01-01", "2016-08-01"))
    b.condition(2, "F14.10", "2015-01-01")
    b.drug(2, PROPOFOL, "2016-06-01")
    # 3: exposed, only 214 days of observation before index: fails washout.
    b.person(3, obs=("2015-06-01", "2020-12-31"))
    b.condition(3, "F14.20", "2015-07-01")
    b.drug(3, KETAMINE, "2016-01-01")
    # 4: comparator, 16 at index: fails age.
    b.person(4, year_of_birth=2000)
    b.condition(4, "F14.20", "2015-01-01")
    b.drug(4, PROPOFOL, "2016-01-01")
    # 5: comparator with remission before index: prior outcome.
    b.person(5)
    b.condition(5, "F14.20", "2015-01-01")
    b.condition(5, "F14.11", "2015-06-01")
    b.drug(5, MIDAZOLAM, "2016-01-01")
    # 6: comparator whose observation ends on the index day: no time at risk.
    b.person(6, obs=("2010-01-01", "2016-01-01"))
    b.condition(6, "F14.20", "2015-01-01")
    b.drug(6, PROPOFOL, "2016-01-01")
    # 7: ketamine before the CUD diagnosis, propofol after: neither arm.
    b.person(7)
    b.drug(7, KETAMINE, "2014-01-01")
    b.condition(7, "F14.20", "2015-01-01")
    b.drug(7, PROPOFOL, "2016-01-01")
    # 8: no CUD at all; 9: only a remission code (not an entry code).
    b.person(8)
    b.drug(8, KETAMINE, "2016-01-01")
    b.person(9)
    b.condition(9, "F14.21", "2015-01-01")
    b.drug(9, KETAMINE, "2016-01-01")
    # 10: comparator who dies on day 31; the later remission does not count.
    b.person(10)
    b.condition(10, "F14.20", "2015-01-01")
    b.drug(10, PROPOFOL, "2016-01-01")
    b.death(10, "2016-02-01")
    b.condition(10, "F14.21", "2016-03-01")
    # 11: exposed, remission after day 365: censored at 365; covariates in and out of window.
    b.person(11)
    b.condition(11, "F14.20", "2015-01-01")
    b.drug(11, KETAMINE, "2016-01-01")
    b.condition(11, "F14.21", "2017-02-15")
    b.condition(11, "F32.9", "2015-12-01")
    b.condition(11, "F41.1", "2014-01-01")
    b.visit(11, "2015-11-01", VISIT_EMERGENCY)
    b.visit(11, "2015-12-31", VISIT_EMERGENCY)
    b.visit(11, "2014-06-01", VISIT_EMERGENCY)
    b.visit(11, "2015-11-15")
    # 12: propofol first, ketamine a year later: exposed, index at the ketamine.
    b.person(12)
    b.condition(12, "F14.20", "2015-01-01")
    b.drug(12, PROPOFOL, "2016-01-01")
    b.drug(12, KETAMINE, "2017-01-01")
    return b


@pytest.fixture(scope="module")
def store(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    root = tmp_path_factory.mktemp("site")
    hand_built_site().write(root / "lake")
    backend = DeltaBackend(spark, "site_x")
    return DatasetStore(backend, OmopTables(backend, root / "lake", "site_x"), root / "work", "site_x")


def test_attrition_follows_each_rule(store: DatasetStore) -> None:
    steps = {s.step: (s.n_persons, s.n_exposed, s.n_comparator) for s in store.get(PROTOCOL).attrition}
    assert steps == {
        "entry": (10, None, None),
        "arm": (9, 4, 5),
        "washout": (8, 3, 5),
        "age": (7, 3, 4),
        "no_prior_outcome": (6, 3, 3),
        "time_at_risk": (5, 3, 2),
    }


def test_analysis_rows_are_as_worked_out_by_hand(store: DatasetStore) -> None:
    rows = {r["person_id"]: r.asDict() for r in store.get(PROTOCOL).frame.collect()}
    assert sorted(rows) == [1, 2, 10, 11, 12]
    observed = {pid: (r["treatment"], r["time"], r["event"]) for pid, r in rows.items()}
    assert observed == {1: (1, 60, 1), 2: (0, 61, 0), 10: (0, 31, 0), 11: (1, 365, 0), 12: (1, 365, 0)}
    assert (rows[1]["sex_female"], rows[1]["race_black"], rows[1]["race_other"]) == (1, 1, 0)
    assert rows[1]["age"] == 36.0
    assert (rows[11]["depression"], rows[11]["anxiety"], rows[11]["prior_emergency_visits"]) == (1, 0, 2)
    assert rows[12]["index_date"].isoformat() == "2017-01-01"
    assert rows[1]["site_id"] == "site_x"


def test_dataset_is_reused_until_an_input_table_changes(spark: SparkSession, tmp_path: Path) -> None:
    hand_built_site().write(tmp_path / "lake")

    def open_store() -> DatasetStore:
        backend = DeltaBackend(spark, "site_x")
        return DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_x"), tmp_path / "work", "site_x")

    store = open_store()
    first = store.get(PROTOCOL)
    assert first.rebuilt
    assert store.get(PROTOCOL) is first  # in memory within a study's rounds
    reopened = open_store().get(PROTOCOL)  # after a restart: from the Delta cache
    assert not reopened.rebuilt
    assert reopened.delta_version == first.delta_version
    site = hand_built_site()
    site.death(2, "2016-07-01")  # person 2 now dies on day 30 instead of leaving on day 61
    site.write(tmp_path / "lake")
    changed = open_store().get(PROTOCOL)
    assert changed.rebuilt
    assert changed.delta_version == first.delta_version + 1
    times = {r["person_id"]: r["time"] for r in changed.frame.collect()}
    assert times[2] == 30


def test_missing_table_names_site_and_table(spark: SparkSession, tmp_path: Path) -> None:
    hand_built_site().write(tmp_path / "lake", skip=("death",))
    backend = DeltaBackend(spark, "site_y")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_y"), tmp_path / "work", "site_y")
    with pytest.raises(MissingTableError, match=r"site 'site_y'.*'death'.*Fix"):
        store.get(PROTOCOL)


# Standard concepts for the concept-set test (made-up ids in the local range).
CUD, CUD_CHILD, REMISSION, ANAESTHESIA, KETAMINE_PROC, KETAMINE_PROC_CHILD, SEDATION = (
    2_000_000_101, 2_000_000_102, 2_000_000_103, 2_000_000_200, 2_000_000_201, 2_000_000_202, 2_000_000_203,
)


def concept_protocol() -> StudyProtocol:
    """Entry, outcome and arms by standard concepts; arms from procedures with descendants."""
    data = PROTOCOL.model_dump(mode="json")
    data["population"]["entry"] = {"concept_ids": [CUD], "include_descendants": True}
    data["outcome"]["codes"] = {"concept_ids": [REMISSION]}
    data["exposure"] = {"name": "ketamine (procedure)", "domain": "procedure",
                        "codes": {"concept_ids": [KETAMINE_PROC], "include_descendants": True}}
    data["comparator"] = {"name": "other anaesthesia", "domain": "procedure",
                          "codes": {"concept_ids": [ANAESTHESIA], "include_descendants": True,
                                    "exclude_concept_ids": [KETAMINE_PROC]}}
    return StudyProtocol.model_validate(data)


def concept_site() -> OmopBuilder:
    b = OmopBuilder()
    b.ancestor(CUD, CUD_CHILD)
    for child in (KETAMINE_PROC, SEDATION):
        b.ancestor(ANAESTHESIA, child)
    b.ancestor(ANAESTHESIA, KETAMINE_PROC_CHILD, levels=2)
    b.ancestor(KETAMINE_PROC, KETAMINE_PROC_CHILD)
    # 1: entry by a descendant of CUD; ketamine procedure by a descendant; remission on day 31.
    b.person(1)
    b.condition(1, "x", "2015-01-01", concept=CUD_CHILD)
    b.procedure(1, "p", "2016-01-01", concept=KETAMINE_PROC_CHILD)
    b.condition(1, "y", "2016-02-01", concept=REMISSION)
    # 2: comparator by sedation (a descendant of anaesthesia, not of ketamine).
    b.person(2)
    b.condition(2, "x", "2015-01-01", concept=CUD)
    b.procedure(2, "p", "2016-01-01", concept=SEDATION)
    # 3: a drug record with the ketamine concept does not count: the arms are procedures.
    b.person(3)
    b.condition(3, "x", "2015-01-01", concept=CUD)
    b.drug(3, "d", "2016-01-01", concept=KETAMINE_PROC)
    # 4: ketamine itself is excluded from the comparator, and is the exposure.
    b.person(4)
    b.condition(4, "x", "2015-01-01", concept=CUD)
    b.procedure(4, "p", "2016-03-01", concept=KETAMINE_PROC)
    return b


def test_concept_sets_with_descendants_and_procedure_arms(spark: SparkSession, tmp_path: Path) -> None:
    concept_site().write(tmp_path / "lake")
    backend = DeltaBackend(spark, "site_c")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_c"), tmp_path / "work", "site_c")
    dataset = store.get(concept_protocol())
    rows = {r["person_id"]: (r["treatment"], r["time"], r["event"]) for r in dataset.frame.collect()}
    assert rows == {1: (1, 31, 1), 2: (0, 365, 0), 4: (1, 365, 0)}
    assert set(dataset.input_versions) >= {"procedure_occurrence", "concept_ancestor"}


def test_a_protocol_needing_concept_ancestor_names_the_reason(spark: SparkSession, tmp_path: Path) -> None:
    concept_site().write(tmp_path / "lake", skip=("concept_ancestor",))
    backend = DeltaBackend(spark, "site_d")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_d"), tmp_path / "work", "site_d")
    with pytest.raises(MissingTableError, match=r"site 'site_d'.*'concept_ancestor'.*include_descendants.*Fix"):
        store.get(concept_protocol())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # Person 5's remission lies 214 days before index: outside a 100-day lookback, so 5 stays.
        ({"prior_outcome_lookback_days": 100}, [1, 2, 5, 10, 11, 12]),
        # At least 62 days at risk: 2 (61 days) and 10 (dies on day 31) leave; 1 stays, as in
        # CohortMethod the days at risk run to the end of the risk window, not to the event.
        ({"min_days_at_risk": 62}, [1, 11, 12]),
        # Both arms have index dates from 2016-01-01 to 2016-06-01: 12 (2017-01-01) leaves.
        ({"restrict_to_common_period": True}, [1, 2, 10, 11]),
    ],
)
def test_study_population_options(store: DatasetStore, options: dict[str, object], expected: list[int]) -> None:
    data = PROTOCOL.model_dump(mode="json")
    data["study_population"] = options
    dataset = store.get(StudyProtocol.model_validate(data))
    assert sorted(r["person_id"] for r in dataset.frame.collect()) == expected
    if "restrict_to_common_period" in options:
        assert "common_period" in [step.step for step in dataset.attrition]


def test_an_empty_concept_ancestor_is_named(spark: SparkSession, tmp_path: Path) -> None:
    site = concept_site()
    site.rows["concept_ancestor"] = []
    site.write(tmp_path / "lake")
    backend = DeltaBackend(spark, "site_e")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_e"), tmp_path / "work", "site_e")
    with pytest.raises(DataError, match=r"'concept_ancestor' has no rows.*Fix"):
        store.get(concept_protocol())


def test_a_data_quality_error_blocks_the_study_and_leaves_the_tables_alone(spark: SparkSession, tmp_path: Path) -> None:
    site = hand_built_site()
    site.rows["observation_period"][0]["observation_period_end_date"] = d("2009-01-01")  # ends before it starts
    site.write(tmp_path / "lake")
    versions = {name: DeltaTable(str(tmp_path / "lake" / name)).version() for name in STUDY_TABLES}
    backend = DeltaBackend(spark, "site_q")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_q"), tmp_path / "work", "site_q")
    with pytest.raises(DataQualityError, match=r"site 'site_q'.*observation_period"):
        store.get(PROTOCOL)
    assert {name: DeltaTable(str(tmp_path / "lake" / name)).version() for name in STUDY_TABLES} == versions
    assert (tmp_path / "work" / "studies" / PROTOCOL.study_id / "data_quality.json").exists()


# --- time at risk anchors, censoring at death, drug eras, unmatched concept sets ----------
#
# Day numbers are days after the index date 2016-01-01 (2016 is a leap year):
# 01-05 = 4, 01-10 = 9, 01-11 = 10, 01-20 = 19, 01-31 = 30, 02-01 = 31, 02-10 = 40,
# 02-15 = 45, 03-01 = 60. Every person enters on 2015-01-01, is 36 at index and has
# observation from 2010 (washout met) to 2020-12-31 unless said otherwise.


def anchor_site() -> OmopBuilder:
    b = OmopBuilder()
    for pid in range(1, 9):
        b.person(pid, obs=("2010-01-01", "2016-01-11" if pid == 7 else "2020-12-31"))
        b.condition(pid, "F14.20", "2015-01-01")
    # 1: exposed, ketamine until day 30 (cohort end 30); remission on day 60.
    b.drug(1, KETAMINE, "2016-01-01", end="2016-01-31")
    b.condition(1, "F14.21", "2016-03-01")
    # 2: comparator, propofol with no end date and 10 days of supply: cohort end 1 + 10 - 1 = day 9.
    b.drug_without_end(2, PROPOFOL, "2016-01-01", days_supply=10)
    # 3: comparator, propofol with neither end date nor supply: cohort end = start, day 0;
    #    remission on day 45.
    b.drug_without_end(3, PROPOFOL, "2016-01-01", days_supply=None)
    b.condition(3, "F14.21", "2016-02-15")
    # 4: exposed, two ketamine records on the index day ending on days 4 and 19: cohort end
    #    is the later, day 19. Dies on day 40 (observation goes on); remission on day 60.
    b.drug(4, KETAMINE, "2016-01-01", end="2016-01-05")
    b.drug(4, KETAMINE, "2016-01-01", end="2016-01-20")
    b.death(4, "2016-02-10")
    b.condition(4, "F14.21", "2016-03-01")
    # 5: exposed, an end date before the start counts as the start (cohort end day 0);
    #    remission on day 30.
    b.drug(5, KETAMINE, "2016-01-01", end="2015-12-25")
    b.condition(5, "F14.21", "2016-01-31")
    # 6: exposed, ketamine until day 60; remission on day 30, during the exposure.
    b.drug(6, KETAMINE, "2016-01-01", end="2016-03-01")
    b.condition(6, "F14.21", "2016-01-31")
    # 7: comparator (cohort end day 0) whose observation ends on day 10.
    b.drug(7, PROPOFOL, "2016-01-01")
    # 8: comparator by midazolam (cohort end day 0); remission on day 10.
    b.drug(8, MIDAZOLAM, "2016-01-01")
    b.condition(8, "F14.21", "2016-01-11")
    return b


def changed(**fields: object) -> StudyProtocol:
    """The reference protocol with some top-level fields replaced."""
    return StudyProtocol.model_validate({**PROTOCOL.model_dump(mode="json"), **fields})


@pytest.fixture(scope="module")
def anchor_store(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    root = tmp_path_factory.mktemp("anchors")
    anchor_site().write(root / "lake")
    backend = DeltaBackend(spark, "site_a")
    return DatasetStore(backend, OmopTables(backend, root / "lake", "site_a"), root / "work", "site_a")


# Each case: the protocol's changes, then (treatment, time, event) per person kept.
# time = (event day, or the censoring day) - risk start + 1; risk start/end are days after index.
ANCHOR_CASES = {
    # Days 1..365 from index, as before: the numbers of the rules without anchors.
    # 1 event 60; 2 censored 365; 3 event 45; 4 dies on 40 (its day-60 remission comes after);
    # 5, 6 events 30; 7 observation ends 10; 8 event 10.
    "index_1_to_365": (
        {},
        {1: (1, 60, 1), 2: (0, 365, 0), 3: (0, 45, 1), 4: (1, 40, 0), 5: (1, 30, 1), 6: (1, 30, 1),
         7: (0, 10, 0), 8: (0, 10, 1)},
    ),
    # Death no longer censors: 4 is followed to 365 and its remission on day 60 is an event.
    "no_censoring_at_death": (
        {"study_population": {"censor_at_death": False}},
        {1: (1, 60, 1), 2: (0, 365, 0), 3: (0, 45, 1), 4: (1, 60, 1), 5: (1, 30, 1), 6: (1, 30, 1),
         7: (0, 10, 0), 8: (0, 10, 1)},
    ),
    # On treatment: day 1 after index to 30 days after the cohort end. Risk end = cohort end + 30:
    # 1: 30+30 = 60, event on 60 (last day counts). 2: 9+30 = 39, censored. 3: 0+30 = 30, its
    # remission on 45 is after. 4: 19+30 = 49, but dies on 40. 5: 0+30 = 30, event on 30.
    # 6: 60+30 = 90, event on 30. 7: 30, observation ends on 10. 8: 30, event on 10.
    "start_to_end_plus_30": (
        {"time_at_risk": {"start_day": 1, "end_day": 30, "end_anchor": "cohort_end"}, "risk_horizon_days": 60},
        {1: (1, 60, 1), 2: (0, 39, 0), 3: (0, 30, 0), 4: (1, 40, 0), 5: (1, 30, 1), 6: (1, 30, 1),
         7: (0, 10, 0), 8: (0, 10, 1)},
    ),
    # After the exposure: from the day after the cohort end to day 365 after index, at least
    # 15 days at risk. Risk start = cohort end + 1: 1: 31, 2: 10, 3: 1, 4: 20, 5: 1, 6: 61,
    # 7: 1, 8: 1. 6's remission on day 30 lies between index and its risk start: a prior
    # outcome, 6 is dropped. 7 has 10 - 1 + 1 = 10 days at risk (< 15): dropped.
    # 1: event 60 -> 60 - 31 + 1 = 30. 2: censored 365 -> 365 - 10 + 1 = 356. 3: event 45 -> 45.
    # 4: death 40 -> 40 - 20 + 1 = 21. 5: event 30 -> 30. 8: event 10 -> 10.
    "end_plus_1_to_index_365": (
        {"time_at_risk": {"start_day": 1, "start_anchor": "cohort_end", "end_day": 365},
         "study_population": {"min_days_at_risk": 15}},
        {1: (1, 30, 1), 2: (0, 356, 0), 3: (0, 45, 1), 4: (1, 21, 0), 5: (1, 30, 1), 8: (0, 10, 1)},
    ),
    # A delayed start: days 30..365 after index (follow-up at most 336 days, the default horizon).
    # 8's remission on day 10 precedes the risk start: prior outcome, dropped. 7's observation
    # ends on day 10, before day 30: no time at risk, dropped.
    # 1: 60 - 30 + 1 = 31. 2: 365 - 30 + 1 = 336. 3: 45 - 30 + 1 = 16. 4: death 40 - 30 + 1 = 11.
    # 5, 6: event on day 30 -> 1.
    "index_30_to_365": (
        {"time_at_risk": {"start_day": 30, "end_day": 365}, "risk_horizon_days": None},
        {1: (1, 31, 1), 2: (0, 336, 0), 3: (0, 16, 1), 4: (1, 11, 0), 5: (1, 1, 1), 6: (1, 1, 1)},
    ),
}


@pytest.mark.parametrize("case", list(ANCHOR_CASES))
def test_time_at_risk_anchors_offsets_and_death(anchor_store: DatasetStore, case: str) -> None:
    fields, expected = ANCHOR_CASES[case]
    dataset = anchor_store.get(changed(**fields))
    rows = {r["person_id"]: (r["treatment"], r["time"], r["event"]) for r in dataset.frame.collect()}
    assert rows == expected


def test_attrition_names_who_the_anchored_window_drops(anchor_store: DatasetStore) -> None:
    fields, _ = ANCHOR_CASES["end_plus_1_to_index_365"]
    steps = {s.step: (s.n_persons, s.n_exposed, s.n_comparator) for s in anchor_store.get(changed(**fields)).attrition}
    # Exposed 1, 4, 5, 6; comparator 2, 3, 7, 8. 6 goes at the prior outcome, 7 at the time at risk.
    assert steps["arm"] == (8, 4, 4)
    assert steps["no_prior_outcome"] == (7, 3, 4)
    assert steps["time_at_risk"] == (6, 3, 3)


KETAMINE_INGREDIENT, PROPOFOL_INGREDIENT = 2_000_000_301, 2_000_000_302


def era_protocol() -> StudyProtocol:
    """Both arms from drug_era by ingredient concept; at risk from day 1 to the era's end."""
    return changed(
        exposure={"name": "ketamine", "domain": "drug_era", "codes": {"concept_ids": [KETAMINE_INGREDIENT]}},
        comparator={"name": "propofol", "domain": "drug_era", "codes": {"concept_ids": [PROPOFOL_INGREDIENT]}},
        time_at_risk={"start_day": 1, "end_day": 0, "end_anchor": "cohort_end"},
        risk_horizon_days=30,
    )


def era_site() -> OmopBuilder:
    b = OmopBuilder()
    for pid in range(1, 5):
        b.person(pid)
        b.condition(pid, "F14.20", "2015-01-01")
    # 1: ketamine era days 0..45; remission on day 31, inside it: event, time 31.
    b.drug_era(1, KETAMINE_INGREDIENT, "2016-01-01", "2016-02-15")
    b.condition(1, "F14.21", "2016-02-01")
    # 2: propofol era days 0..9: at risk days 1..9, time 9.
    b.drug_era(2, PROPOFOL_INGREDIENT, "2016-01-01", "2016-01-10")
    # 3: a ketamine drug_exposure but no ketamine era, and a propofol era days 0..30: the arms
    #    come from drug_era only, so 3 is a comparator never exposed; time 30.
    b.drug(3, KETAMINE, "2016-01-01", concept=KETAMINE_INGREDIENT)
    b.drug_era(3, PROPOFOL_INGREDIENT, "2016-01-01", "2016-01-31")
    # 4: a ketamine era before entry does not count; the next one (2016-03-01..03-31, 30 days)
    #    is the index: time 30.
    b.drug_era(4, KETAMINE_INGREDIENT, "2014-01-01", "2014-02-01")
    b.drug_era(4, KETAMINE_INGREDIENT, "2016-03-01", "2016-03-31")
    return b


def test_drug_era_arms_and_their_era_end(spark: SparkSession, tmp_path: Path) -> None:
    era_site().write(tmp_path / "lake")
    backend = DeltaBackend(spark, "site_r")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_r"), tmp_path / "work", "site_r")
    dataset = store.get(era_protocol())
    rows = {r["person_id"]: (r["treatment"], r["time"], r["event"]) for r in dataset.frame.collect()}
    assert rows == {1: (1, 31, 1), 2: (0, 9, 0), 3: (0, 30, 0), 4: (1, 30, 0)}
    assert {r["person_id"]: r["index_date"].isoformat() for r in dataset.frame.collect()}[4] == "2016-03-01"
    assert "drug_era" in dataset.input_versions


def test_a_protocol_needing_drug_era_names_the_reason(spark: SparkSession, tmp_path: Path) -> None:
    site = era_site()
    del site.rows["drug_era"]  # a site whose export has no drug_era file
    site.write(tmp_path / "lake")
    backend = DeltaBackend(spark, "site_s")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_s"), tmp_path / "work", "site_s")
    with pytest.raises(MissingTableError, match=r"site 'site_s'.*'drug_era'.*domain: drug_era.*Fix"):
        store.get(era_protocol())


def test_concept_sets_matching_nothing_are_named_and_no_table_changes(spark: SparkSession, tmp_path: Path) -> None:
    hand_built_site().write(tmp_path / "lake")
    versions = {name: DeltaTable(str(tmp_path / "lake" / name)).version() for name in STUDY_TABLES}
    backend = DeltaBackend(spark, "site_u")
    store = DatasetStore(backend, OmopTables(backend, tmp_path / "lake", "site_u"), tmp_path / "work", "site_u")
    # Exposure coded as NDC-like "1234" and the outcome as Z99.9: the site has neither. The
    # entry (F14.*) and comparator (propofol, ...) sets do match.
    protocol = changed(
        exposure={"name": "ketamine", "codes": {"vocabulary": "RxNorm", "include": ["1234"]}},
        outcome={"name": "CUD remission", "codes": {"vocabulary": "ICD10CM", "include": ["Z99.9"]}},
    )
    with pytest.raises(UnmatchedConceptSetError) as raised:
        store.get(protocol)
    message = str(raised.value)
    assert message.startswith("site 'site_u': no record matches 2 concept set(s)")
    assert "`exposure.codes` (ketamine: RxNorm source codes ['1234']) searched in drug_exposure" in message
    assert "`outcome.codes` (CUD remission: ICD10CM source codes ['Z99.9']) searched in condition_occurrence" in message
    assert "population.entry" not in message
    assert "comparator.codes" not in message
    assert "Fix: check how the site codes these records" in message
    assert [(u.field, u.table.split()[0]) for u in raised.value.unmatched] == [
        ("exposure.codes", "drug_exposure"), ("outcome.codes", "condition_occurrence")]
    assert {name: DeltaTable(str(tmp_path / "lake" / name)).version() for name in STUDY_TABLES} == versions
    assert not (tmp_path / "work" / "studies" / PROTOCOL.study_id / "analysis_dataset").exists()
