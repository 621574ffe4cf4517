"""The per-study analysis dataset, built once and kept as a versioned Delta table at the site.

A dataset is reused while the protocol hash and the Delta versions of every input table
are unchanged: from memory within a study's rounds, from its Delta table across restarts.
Otherwise it is rebuilt (a new Delta version, so earlier ones stay readable for audit).
A protocol with large-scale covariates also keeps their long-format features
(site_agent/cohort/features.py) as a Delta table next to the dataset, under the same key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from shared.errors import MissingTableError, UnmatchedConceptSetError
from shared.omop import STUDY_COLUMNS
from shared.protocol.model import StudyProtocol
from site_agent.cohort.builder import COHORT_RULES_VERSION, AttritionStep, build_cohort
from site_agent.cohort.features import FEATURE_SCHEMA, FEATURES_TABLE, concept_features
from site_agent.cohort.inputs import study_inputs, why_needed
from site_agent.data.delta import DeltaBackend, OmopTables
from site_agent.ingest import check_lake

_KEY = "fedrwe.dataset_key"
_ATTRITION = "fedrwe.attrition"


@dataclass(frozen=True)
class AnalysisDataset:
    """A study's rows at this site (Spark, cached) with its provenance."""

    key: str
    frame: DataFrame
    attrition: list[AttritionStep]
    delta_version: int
    input_versions: dict[str, int]
    rebuilt: bool
    build_seconds: float
    features: DataFrame | None = None  # person_id, domain, concept_id (large-scale covariates only)


class DatasetStore:
    """Builds, stores and reloads analysis datasets under ``workdir/studies``."""

    def __init__(self, backend: DeltaBackend, tables: OmopTables, workdir: Path, site_id: str) -> None:
        self._backend = backend
        self._tables = tables
        self._workdir = workdir
        self._site_id = site_id
        self._loaded: dict[str, AnalysisDataset] = {}

    def path(self, study_id: str) -> Path:
        return self._workdir / "studies" / study_id / "analysis_dataset"

    def get(self, protocol: StudyProtocol) -> AnalysisDataset:
        """The dataset for ``protocol``: from memory or the Delta cache if valid, else rebuilt."""
        inputs = study_inputs(protocol)
        input_versions = {name: self._version(protocol, name) for name in inputs}
        key = json.dumps(
            {"protocol": protocol.sha256(), "inputs": input_versions, "rules": COHORT_RULES_VERSION},
            sort_keys=True,
        )
        loaded = self._loaded.get(protocol.study_id)
        if loaded is not None and loaded.key == key:
            return loaded
        if loaded is not None:
            loaded.frame.unpersist()
            if loaded.features is not None:
                loaded.features.unpersist()
        path = self.path(protocol.study_id)
        rebuilt = (
            self._backend.last_commit_metadata(path).get(_KEY) != key
            or self._features_stale(protocol, key)
            or self._backend.lost_files(path)  # a data file of the cached dataset is gone: build it anew
        )
        started = time.perf_counter()
        if rebuilt:
            self._build(protocol, path, key)
        last = self._backend.last_commit_metadata(path)
        attrition = [AttritionStep(**step) for step in json.loads(str(last[_ATTRITION]))]
        snapshot = self._backend.read("analysis_dataset", path)
        dataset = AnalysisDataset(
            key, snapshot.frame.cache(), attrition, snapshot.version, input_versions, rebuilt,
            round(time.perf_counter() - started, 3), self._features(protocol),
        )
        self._loaded[protocol.study_id] = dataset
        return dataset

    def features_path(self, study_id: str) -> Path:
        return self.path(study_id).parent / FEATURES_TABLE

    def _features_stale(self, protocol: StudyProtocol, key: str) -> bool:
        """True when the protocol has large-scale covariates and their table is not from ``key``."""
        if protocol.large_scale_covariates is None:
            return False
        return self._backend.last_commit_metadata(self.features_path(protocol.study_id)).get(_KEY) != key

    def _features(self, protocol: StudyProtocol) -> DataFrame | None:
        """The large-scale covariates' table (cached), or None when the protocol has none."""
        if protocol.large_scale_covariates is None:
            return None
        path = self.features_path(protocol.study_id)
        return self._backend.read(FEATURES_TABLE, path, FEATURE_SCHEMA).frame.cache()

    def _write_features(self, protocol: StudyProtocol, key: str, inputs: dict[str, DataFrame]) -> None:
        """Build the features from the dataset just written and keep them next to it."""
        dataset = self._backend.read("analysis_dataset", self.path(protocol.study_id)).frame
        features = concept_features(protocol, inputs, dataset).toArrow().cast(FEATURE_SCHEMA)
        self._backend.write_arrow(self.features_path(protocol.study_id), features, {_KEY: key})

    def _version(self, protocol: StudyProtocol, name: str) -> int:
        try:
            return self._tables.version(name)
        except MissingTableError as error:
            if name in STUDY_COLUMNS:
                raise
            raise MissingTableError(self._site_id, name, error.path, why_needed(protocol, name)) from None

    def _check_quality(self, protocol: StudyProtocol) -> None:
        """The data-quality checks of ingest, before every build: errors block the study.

        The report goes next to the study's dataset (the site's tables are never written).
        """
        report = check_lake(self._tables.lake, site_id=self._site_id)
        target = self.path(protocol.study_id).parent / "data_quality.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(report.to_json(), encoding="utf-8")
        report.raise_for_errors(target)

    def _build(self, protocol: StudyProtocol, path: Path, key: str) -> None:
        self._check_quality(protocol)
        snapshots = {name: self._tables.read(name, columns) for name, columns in study_inputs(protocol).items()}
        try:
            cohort = build_cohort(protocol, {name: snap.frame for name, snap in snapshots.items()})
        except UnmatchedConceptSetError as error:
            raise error.at_site(self._site_id) from None
        try:
            rows = cohort.dataset.select(F.lit(self._site_id).alias("site_id"), "*").toArrow()
            attrition_json = json.dumps([step.to_json() for step in cohort.attrition])
            self._backend.write_arrow(path, rows, {_KEY: key, _ATTRITION: attrition_json})
        finally:
            cohort.release()
        if protocol.large_scale_covariates is not None:
            self._write_features(protocol, key, {name: snap.frame for name, snap in snapshots.items()})

