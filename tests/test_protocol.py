"""The study protocol: the shipped study loads; every malformed field is named with its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.errors import ProtocolError
from shared.protocol.model import load_protocol, parse_protocol

PROTOCOL = Path(__file__).parents[1] / "studies" / "ketamine_cud.yaml"


def reference() -> dict[str, Any]:
    data = yaml.safe_load(PROTOCOL.read_text())
    assert isinstance(data, dict)
    return data


def test_the_reference_study_loads_with_stable_hash_and_columns() -> None:
    protocol = load_protocol(PROTOCOL)
    assert protocol.sha256() == load_protocol(PROTOCOL).sha256()
    assert protocol.propensity_columns()[:4] == ["(intercept)", "age", "sex_female", "race_black"]
    assert protocol.covariate_columns()[-1] == "prior_emergency_visits"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("outcome"), r"field `outcome`: Field required. Fix: add the field"),
        (lambda d: d.update(washout_dayz=365), r"field `washout_dayz`: Extra inputs .* fix its spelling"),
        (lambda d: d.update(washout_days="a year"), r"field `washout_days`.*\(got 'a year'\)"),
        (lambda d: d["exposure"]["codes"].update(vocabulary="SNOMED"), r"exposure.codes.vocabulary"),
        (lambda d: d["exposure"]["codes"].update(include=["F14 .*"]), r"not a source code or a prefix"),
        (lambda d: d.update(time_at_risk={"start_day": 30, "end_day": 1}), r"end_day 1 is before start_day 30"),
        (lambda d: d.update(time_at_risk={"start_day": 0, "end_day": 365}), r"start_day must be 1"),
        (lambda d: d["covariates"].append({"name": "time", "kind": "visit_count", "visit_concept_ids": [1]}), r"reserved"),
        (lambda d: d["covariates"].append({"name": "sex2", "kind": "sex"}), r"repeated columns \['sex_female'\]"),
        (lambda d: d.update(analyses=["matched_magic"]), r"field `analyses.0`"),
    ],
)
def test_malformed_fields_are_named(change: Any, expected: str) -> None:
    data = reference()
    change(data)
    with pytest.raises(ProtocolError, match=expected):
        parse_protocol(data, "test.yaml")


def test_unreadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="cannot read protocol"):
        load_protocol(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("study_id: [unclosed\n")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(broken)
