"""OMOP ingest and data quality on the two real exports in ../shared/data/omop and on a
hand-made export with planted problems. Expected values are counted from the CSV files
with Python's csv module, independently of the pyarrow code under test."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession
from typer.testing import CliRunner

from flows.cli import app
from shared.errors import DataQualityError, IngestError
from shared.omop import CDM_SCHEMAS, SCHEMAS
from site_agent.data.delta import DeltaBackend, OmopTables
from site_agent.ingest import IngestResult, IngestSettings, check_lake, ingest_omop
from site_agent.ingest.split import home_care_sites
from tests.samples import SAMPLES

MIMIC = SAMPLES / "mimic_iv_demo" / "csv"
SYNTHEA = SAMPLES / "synthea27nj"
TODAY = dt.date(2024, 1, 1)
MIMIC_TABLES = {
    "person": "person.csv", "observation_period": "observation_period.csv",
    "visit_occurrence": "visit_occurrence.csv", "visit_detail": "visit_detail.csv",
    "condition_occurrence": "condition_occurrence.csv", "drug_exposure": "drug_exposure.csv",
    "procedure_occurrence": "procedure_occurrence.csv", "device_exposure": "device_exposure.csv",
    "death": "death.csv", "drug_era": "drug_era.csv", "condition_era": "condition_era.csv",
    "care_site": "care_site.csv", "cdm_source": "cdm_source.csv", "concept": "2b_concept.csv",
    "concept_relationship": "2b_concept_relationship.csv", "vocabulary": "2b_vocabulary.csv",
}
SYNTHEA_TABLES = {name: f"{name.upper()}.csv" for name in CDM_SCHEMAS}


def csv_records(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        return [{k.lower(): v for k, v in row.items()} for row in csv.DictReader(stream)]


def csv_count(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as stream:
        return sum(1 for _ in csv.reader(stream)) - 1  # records (quoted newlines included), no header


def ingest(omop: Path, lake: Path, site_id: str = "site_a", care_site_id: int | None = None) -> IngestResult:
    settings = IngestSettings(omop=omop, site_id=site_id, lake=lake, care_site_id=care_site_id)
    return ingest_omop(settings, today=TODAY)


def delta(lake: Path, name: str) -> pa.Table:
    return pa.table(DeltaTable(str(lake / name)).to_pyarrow_table())


@pytest.fixture(scope="module")
def mimic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, IngestResult]:
    export = shutil.copytree(MIMIC, tmp_path_factory.mktemp("mimic") / "csv")
    lake = tmp_path_factory.mktemp("mimic_lake")
    return lake, ingest(export, lake, "mimic")


@pytest.fixture(scope="module")
def synthea(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, IngestResult]:
    export = shutil.copytree(SYNTHEA, tmp_path_factory.mktemp("synthea") / "export")
    lake = tmp_path_factory.mktemp("synthea_lake")
    return lake, ingest(export, lake, "synthea")


# --- the two real exports ---------------------------------------------------------------


@pytest.mark.parametrize(("sample", "source", "files", "version"), [
    ("mimic", MIMIC, MIMIC_TABLES, "5.3"), ("synthea", SYNTHEA, SYNTHEA_TABLES, "5.4"),
])
def test_both_samples_ingest_every_row_with_no_blocking_finding(
    sample: str, source: Path, files: dict[str, str], version: str, request: pytest.FixtureRequest
) -> None:
    lake, result = request.getfixturevalue(sample)
    assert result.cdm_version == version
    assert {t.table: t.source for t in result.tables} == files
    for name, file in files.items():
        table = delta(lake, name)
        assert table.num_rows == csv_count(source / file), name
        assert table.schema.equals(CDM_SCHEMAS[name]), name
    assert result.report.errors == ()  # warnings only: see docs/ingest.md for what they say
    assert "cohort.csv" in {s.lower() for s in result.skipped}


def test_negative_64_bit_ids_survive(mimic: tuple[Path, IngestResult]) -> None:
    lake, _ = mimic
    expected = {int(row["person_id"]) for row in csv_records(MIMIC / "person.csv")}
    ingested = set(delta(lake, "person")["person_id"].to_pylist())
    assert ingested == expected
    assert min(ingested) < -(2**62)
    assert max(ingested) > 2**62


def test_columns_are_typed_and_53_names_mapped_to_54(mimic: tuple[Path, IngestResult]) -> None:
    lake, result = mimic
    visits = delta(lake, "visit_occurrence")
    assert visits.schema.field("visit_start_date").type == pa.date32()
    assert visits.schema.field("visit_start_datetime").type == pa.timestamp("us")
    source = sorted(csv_records(MIMIC / "visit_occurrence.csv"), key=lambda r: int(r["visit_occurrence_id"]))
    rows = visits.sort_by("visit_occurrence_id").to_pylist()
    assert [r["visit_start_date"].isoformat() for r in rows] == [s["visit_start_date"] for s in source]
    assert [r["admitted_from_source_value"] or "" for r in rows] == [s["admitting_source_value"] for s in source]
    assert [r["discharged_to_concept_id"] for r in rows] == [
        int(s["discharge_to_concept_id"]) if s["discharge_to_concept_id"] else None for s in source
    ]
    mapped = {t.table: t for t in result.tables}
    assert mapped["visit_detail"].renamed["visit_detail_parent_id"] == "parent_visit_detail_id"
    assert mapped["procedure_occurrence"].added == ("procedure_end_date", "procedure_end_datetime")
    assert delta(lake, "procedure_occurrence")["procedure_end_date"].null_count == 18_447
    assert delta(lake, "person")["month_of_birth"].null_count == 100  # empty in the export


def test_reingest_of_the_same_files_creates_no_new_version(synthea: tuple[Path, IngestResult]) -> None:
    lake, first = synthea
    again = ingest(Path(first.source), lake, "synthea")
    assert not any(t.changed for t in again.tables)
    assert {t.table: t.version for t in again.tables} == {t.table: t.version for t in first.tables}
    assert len(DeltaTable(str(lake / "concept_relationship")).history()) == 1


def test_a_changed_file_creates_one_new_version(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    for name in ("PERSON.csv", "OBSERVATION_PERIOD.csv", "DEATH.csv", "CDM_SOURCE.csv"):
        shutil.copy(SYNTHEA / name, export / name)
    ingest(export, tmp_path / "lake")
    text = (export / "PERSON.csv").read_text()
    (export / "PERSON.csv").write_text(text.replace("1,8507,1998,", "1,8507,1999,", 1))
    result = ingest(export, tmp_path / "lake")
    assert {t.table: (t.version, t.changed) for t in result.tables} == {
        "person": (1, True), "observation_period": (0, False), "death": (0, False), "cdm_source": (0, False),
    }
    person = DeltaTable(str(tmp_path / "lake" / "person"))
    assert [h["version"] for h in person.history()] == [1, 0]
    assert birth_year(pa.table(person.to_pyarrow_table()), 1) == 1999
    person.load_as_version(0)  # Delta time travel: the first ingest is still there
    assert birth_year(pa.table(person.to_pyarrow_table()), 1) == 1998


def birth_year(person: pa.Table, person_id: int) -> int:
    years = {row["person_id"]: row["year_of_birth"] for row in person.to_pylist()}
    return int(years[person_id])


def test_a_bad_date_names_file_column_row_and_value_and_changes_nothing(tmp_path: Path) -> None:
    export = tmp_path / "csv"
    export.mkdir()
    for name in ("person.csv", "observation_period.csv"):
        shutil.copy(MIMIC / name, export / name)
    lake = tmp_path / "lake"
    ingest(export, lake)
    lines = (export / "observation_period.csv").read_text().splitlines(keepends=True)
    fields = lines[37].split(",")  # data row 37, line 38
    fields[3] = "2110-02-30"
    lines[37] = ",".join(fields)
    (export / "observation_period.csv").write_text("".join(lines))
    with pytest.raises(IngestError) as raised:
        ingest(export, lake)
    message = str(raised.value)
    for part in ("'site_a'", "observation_period.csv row 37 (line 38)", "'observation_period_end_date'",
                 "'2110-02-30'", "a date (YYYY-MM-DD)", "Fix:"):
        assert part in message
    for name in ("person", "observation_period"):
        assert DeltaTable(str(lake / name)).version() == 0


def test_mimic_split_by_care_site_keeps_that_sites_persons(
    mimic: tuple[Path, IngestResult], tmp_path: Path
) -> None:
    # MIMIC fills care_site_id only in visit_detail: a person's site is that of most of
    # their visit details (ties: the smaller id), counted here from the CSV.
    assert all(not r["care_site_id"] for r in csv_records(MIMIC / "person.csv"))
    per_person: dict[int, Counter[int]] = defaultdict(Counter)
    for row in csv_records(MIMIC / "visit_detail.csv"):
        if row["care_site_id"]:
            per_person[int(row["person_id"])][int(row["care_site_id"])] += 1
    home = {p: min(c, key=lambda s: (-c[s], s)) for p, c in per_person.items()}
    site, size = Counter(home.values()).most_common(1)[0]
    persons = {p for p, s in home.items() if s == site}

    lake = tmp_path / "lake"
    ingest(MIMIC, lake, "mimic_one", care_site_id=site)
    assert set(delta(lake, "person")["person_id"].to_pylist()) == persons
    assert len(persons) == size
    conditions = [r for r in csv_records(MIMIC / "condition_occurrence.csv") if int(r["person_id"]) in persons]
    assert delta(lake, "condition_occurrence").num_rows == len(conditions)
    for name in ("visit_detail", "drug_exposure", "death", "observation_period"):
        assert set(delta(lake, name)["person_id"].to_pylist()) <= persons, name
    assert delta(lake, "concept").num_rows == 3885
    assert delta(lake, "care_site").num_rows == 31
    whole_lake, _ = mimic
    everyone = home_care_sites({n: delta(whole_lake, n) for n in ("person", "visit_occurrence", "visit_detail")})
    assert everyone == home
    assert len(everyone) == 100
    assert len(set(everyone.values())) == 16


def test_the_site_agents_spark_reader_reads_ingested_tables(
    mimic: tuple[Path, IngestResult], synthea: tuple[Path, IngestResult], spark: SparkSession
) -> None:
    lake, _ = mimic
    tables = OmopTables(DeltaBackend(spark, "mimic"), lake, "mimic")
    person = tables.read("person").frame
    types = dict(person.dtypes)
    assert {f.name: types[f.name] for f in SCHEMAS["person"]} == {
        **dict.fromkeys(("person_id", "care_site_id"), "bigint"),
        **dict.fromkeys(("gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth",
                         "race_concept_id", "ethnicity_concept_id"), "int"),
        **dict.fromkeys(("person_source_value", "gender_source_value", "race_source_value"), "string"),
    }
    counts = person.selectExpr("count(*) AS n", "count_if(person_id < 0) AS negative").first()
    assert counts is not None
    assert counts["n"] == 100
    assert counts["negative"] > 0
    visits = tables.read("visit_occurrence").frame
    assert dict(visits.dtypes)["visit_start_date"] == "date"
    synthea_lake, _ = synthea
    empty = OmopTables(DeltaBackend(spark, "synthea"), synthea_lake, "synthea").read("concept_ancestor")
    assert empty.version == 0
    assert "descendant_concept_id" in empty.frame.columns


# --- planted problems -------------------------------------------------------------------

PLANTED = {
    "person.csv": """person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth,race_concept_id,ethnicity_concept_id
1,8507,1970,,,8527,0
2,8532,1980,5,1,8527,38003564
3,8507,2030,,,8527,38003564
4,8532,1990,,,8527,38003564
""",
    "observation_period.csv": """observation_period_id,person_id,observation_period_start_date,observation_period_end_date,period_type_concept_id
10,1,2010-01-01,2020-12-31,32817
11,2,2020-12-31,2010-01-01,32817
12,3,2031-01-01,2032-01-01,32817
""",
    "condition_occurrence.csv": """condition_occurrence_id,person_id,condition_concept_id,condition_start_date,condition_end_date,condition_type_concept_id,visit_occurrence_id,condition_source_value
100,1,201826,2015-01-01,2015-02-01,32817,500,E11.9
101,99,201826,2015-01-01,,32817,,E11.9
102,1,123,2015-03-01,,32817,,X
103,1,0,2015-04-01,,32817,777,Y
104,1,201826,2021-06-01,2021-05-01,32817,,E11.9
105,2,201826,2015-01-01,,32817,,E11.9
""",
    "visit_occurrence.csv": """visit_occurrence_id,person_id,visit_concept_id,visit_start_date,visit_end_date,visit_type_concept_id
500,1,9201,2015-01-01,2015-01-02,32817
""",
    "drug_exposure.csv": "drug_exposure_id,person_id,drug_concept_id,drug_exposure_start_date,"
                         "drug_exposure_end_date,drug_type_concept_id\n",
    "death.csv": "person_id,death_date,death_type_concept_id\n2,1979-01-01,32817\n",
    "concept.csv": """concept_id,concept_name,domain_id,vocabulary_id,concept_class_id,standard_concept,concept_code,valid_start_date,valid_end_date,invalid_reason
8507,MALE,Gender,Gender,Gender,S,M,1970-01-01,2099-12-31,
8532,FEMALE,Gender,Gender,Gender,S,F,1970-01-01,2099-12-31,
8527,White,Race,Race,Race,S,5,1970-01-01,2099-12-31,
38003564,Not Hispanic or Latino,Ethnicity,Ethnicity,Ethnicity,S,Not Hispanic,1970-01-01,2099-12-31,
32817,EHR,Type Concept,Type Concept,Type Concept,S,OMOP4976890,1970-01-01,2099-12-31,
201826,Type 2 diabetes mellitus,Condition,SNOMED,Clinical Finding,S,44054006,1970-01-01,2099-12-31,
9201,Inpatient Visit,Visit,Visit,Visit,S,IP,1970-01-01,2099-12-31,
""",
}
# (check, severity, table, column) -> (rows, example id): worked out from PLANTED by hand.
PLANTED_FINDINGS = {
    ("end_before_start", "error", "observation_period", "observation_period_end_date"): (1, "11"),
    ("orphan_person", "error", "condition_occurrence", "person_id"): (1, "101"),
    ("end_before_start", "warning", "condition_occurrence", "condition_end_date"): (1, "104"),
    # 101: person 99 has no period; 104: after person 1's period; 105: person 2's period is inverted.
    ("outside_observation", "warning", "condition_occurrence", "condition_start_date"): (3, "101"),
    ("orphan_visit", "warning", "condition_occurrence", "visit_occurrence_id"): (1, "103"),
    ("unknown_concept", "warning", "condition_occurrence", "condition_concept_id"): (1, "102"),
    ("unmapped_concept", "warning", "condition_occurrence", "condition_concept_id"): (1, "103"),
    ("unmapped_concept", "warning", "person", "ethnicity_concept_id"): (1, "1"),
    ("birth_in_future", "warning", "person", "year_of_birth"): (1, "3"),
    ("no_observation_period", "warning", "person", "person_id"): (1, "4"),
    ("death_before_birth", "warning", "death", "death_date"): (1, "2"),
}


def planted_export(folder: Path, **changes: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {**PLANTED, **changes}.items():
        (folder / name).write_text(text)
    return folder


def strict_json(path: Path) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_report_finds_the_planted_problems_with_their_severities(tmp_path: Path) -> None:
    result = ingest(planted_export(tmp_path / "export"), tmp_path / "lake")
    found = {(f.check, f.severity, f.table, f.column): (f.count, f.example_id) for f in result.report.findings}
    assert found == PLANTED_FINDINGS
    saved = strict_json(Path(result.report_path))
    assert isinstance(saved, dict)
    assert saved["errors"] == 2
    assert saved["warnings"] == 9
    assert saved["tables"]["condition_occurrence"] == {"rows": 6, "version": 0}
    again = check_lake(tmp_path / "lake", today=TODAY)  # before a study: same findings
    assert again.findings == result.report.findings
    assert again.site_id == "site_a"
    with pytest.raises(DataQualityError) as raised:
        again.raise_for_errors()
    assert "observation_period.observation_period_end_date [end_before_start]" in str(raised.value)
    assert "condition_occurrence.person_id [orphan_person]" in str(raised.value)


def test_report_json_of_the_samples_has_no_nan(
    mimic: tuple[Path, IngestResult], synthea: tuple[Path, IngestResult]
) -> None:
    for _, result in (mimic, synthea):
        saved = strict_json(Path(result.report_path))
        assert isinstance(saved, dict)
        assert saved["errors"] == 0
        strict_json(Path(result.report_path).with_name("ingest.json"))


def test_the_cli_ingests_from_the_site_config_and_strict_fails_on_errors(tmp_path: Path) -> None:
    export = planted_export(tmp_path / "export")
    config = tmp_path / "site.toml"
    config.write_text(f'site_id = "st_marys"\nlake = "{tmp_path / "lake"}"\nworkdir = "{tmp_path}"\n')
    runner = CliRunner()
    ok = runner.invoke(app, ["site", "ingest", "--omop", str(export), "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "end_before_start" in ok.output
    assert DeltaTable(str(tmp_path / "lake" / "person")).version() == 0
    strict = runner.invoke(app, ["site", "ingest", "--omop", str(export), "--config", str(config), "--strict"])
    assert isinstance(strict.exception, DataQualityError)
    assert "'st_marys'" in str(strict.exception)
    check = runner.invoke(app, ["site", "check", "--config", str(config)])  # what every study runs first
    assert isinstance(check.exception, DataQualityError)
    assert "end_before_start" in check.output


# --- exports fedrwe cannot read: each named clearly ---------------------------------------


@pytest.mark.parametrize(("changes", "expected"), [
    ({"death.csv": "death_date\n2020-01-01\n"},
     ["death.csv (OMOP table 'death') lacks the required column(s) ['person_id']"]),
    ({"visit_occurrence.csv": "visit_occurrence_id,person_id,visit_concept_id,visit_start_date,visit_end_date,"
                              "visit_type_concept_id\n500,1,9201,,2015-01-02,32817\n"},
     ["visit_occurrence.csv row 1 (line 2)", "'visit_start_date'", "visit_occurrence_id='500'", "1 of 1 rows"]),
    ({"condition_occurrence.csv": PLANTED["condition_occurrence.csv"].replace("102,1,123,", "102,1,3000000000,")},
     ["condition_occurrence.csv row 3 (line 4)", "'condition_concept_id'", "'3000000000'", "32-bit"]),
    ({"cdm_source.csv": "cdm_source_name,cdm_version\nX,v6.0\n"}, ["cdm_version is 'v6.0'", "5.3 and 5.4"]),
    ({"PERSON.csv": PLANTED["person.csv"]}, ["two files for OMOP table 'person'"]),
])
def test_bad_exports_are_named_clearly(tmp_path: Path, changes: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(IngestError) as raised:
        ingest(planted_export(tmp_path / "export", **changes), tmp_path / "lake")
    for part in expected:
        assert part in str(raised.value)
    assert not (tmp_path / "lake").exists()


def test_parquet_and_athena_style_files_give_the_same_tables(tmp_path: Path) -> None:
    csv_lake = tmp_path / "csv_lake"
    ingest(planted_export(tmp_path / "export"), csv_lake)
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for name, text in PLANTED.items():  # pyarrow's own type guesses: int64 ids, date32 dates
        table = pa_csv.read_csv(pa.BufferReader(text.encode()))
        pq.write_table(table.rename_columns([c.upper() for c in table.column_names]),
                       parquet / name.upper().replace(".CSV", ".parquet"))
    settings = IngestSettings(omop=parquet, source_format="parquet", site_id="site_a", lake=tmp_path / "pq_lake")
    ingest_omop(settings, today=TODAY)
    athena = planted_export(tmp_path / "athena", **{"concept.csv": PLANTED["concept.csv"].replace(",", "\t")
                                                    .replace("1970-01-01", "19700101")})
    ingest(athena, tmp_path / "athena_lake")
    for name in ("person", "condition_occurrence", "death", "concept"):
        expected = delta(csv_lake, name).sort_by(CDM_SCHEMAS[name].names[0])
        assert delta(tmp_path / "pq_lake", name).sort_by(CDM_SCHEMAS[name].names[0]).equals(expected), name
        assert delta(tmp_path / "athena_lake", name).sort_by(CDM_SCHEMAS[name].names[0]).equals(expected), name
