"""The cohort rules of docs/cohort_rules.md on a hand-built OMOP site, answers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from shared.errors import DataError, DataQualityError, MissingTableError
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
