"""The engine benchmark's DuckDB cohort equals the site's Spark cohort (bench/cohort_engines.py).

A speed figure for a wrong answer is worthless: on a tiny synthetic site the benchmark-only
DuckDB rules (bench/duckdb_cohort.py) must give the analysis dataset and attrition that the
site's Spark builder gives, every column exactly, for the reference protocol; a protocol
using features the DuckDB rules lack is refused by name; a differing column is named.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql import SparkSession

from bench.cohort_engines import EnginesDisagree, compare, duckdb_extract, spark_extract
from bench.duckdb_cohort import check_supported
from shared.errors import ProtocolError
from shared.protocol.model import StudyProtocol, load_protocol
from shared.synthetic import generate_network, site_lake

REFERENCE = Path(__file__).resolve().parents[1] / "studies" / "ketamine_cud.yaml"


def test_duckdb_cohort_equals_spark_cohort(spark: SparkSession, tmp_path: Path) -> None:
    protocol = load_protocol(REFERENCE)
    generate_network(tmp_path, n_sites=1, n_patients=300, seed=5)
    lake = site_lake(tmp_path, "site_01")

    spark_rows, spark_attrition = spark_extract(spark, lake, protocol)
    duck_rows, duck_attrition = duckdb_extract(lake, protocol)

    assert spark_rows.num_rows > 20
    assert set(spark_rows.column("treatment").to_pylist()) == {0, 1}
    compare(spark_rows, duck_rows, spark_attrition, duck_attrition)

    changed = duck_rows.set_column(
        duck_rows.column_names.index("age"), "age",
        pa.array([a + (0.5 if i == 3 else 0.0) for i, a in enumerate(duck_rows.column("age").to_pylist())]),
    )
    person = duck_rows.column("person_id")[3].as_py()
    with pytest.raises(EnginesDisagree, match=rf"column 'age'.*person {person}"):
        compare(spark_rows, changed, spark_attrition, duck_attrition)

    restricted = StudyProtocol.model_validate({
        **protocol.model_dump(mode="json", exclude_none=True),
        "restrict_to": {"name": "hiv", "codes": {"vocabulary": "ICD10CM", "include": ["B20"]},
                        "window": {"start_day": -365, "end_day": 0}},
    })
    with pytest.raises(ProtocolError, match="restrict_to"):
        check_supported(restricted)
