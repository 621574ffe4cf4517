"""Large-scale covariates at a site: which standard concepts each cohort member has before index.

OHDSI FeatureExtraction's condition / drug / procedure occurrence features, in long format:
one row ``person_id, domain, concept_id`` per person of the analysis dataset and concept
with any record in the window (``StudyProtocol.large_scale_window``). Built with the
dataset and kept as a Delta table next to it (site_agent/cohort/store.py); the propensity
rounds turn it into design columns (site_agent/analyses/large_scale.py).

Left out, so that the propensity model does not separate the arms trivially or repeat a
column (docs/cohort_rules.md, rule 9):
- concept 0 and null (records without a standard concept);
- records matching the exposure's or the comparator's code set, in that arm's domain
  (CohortMethod excludes the target and comparator drugs from the covariates too);
- condition records matching a named ``condition`` covariate's code set (that covariate
  is in the model already) or the restriction's (``restrict_to``: everyone has it);
- with each of these, every standard concept that the matching records carry at this
  site (a set given by source codes would otherwise let the same drug back in under a
  record whose source code the set does not list). Sites whose mappings differ exclude
  different concepts; a concept excluded at one site is released by none there, so the
  selection rule keeps it out of the model everywhere.
"""

from __future__ import annotations

from functools import reduce

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from shared.protocol.model import CodeSet, StudyProtocol
from site_agent.cohort.codes import code_predicate, resolve_concepts

FEATURES_TABLE = "large_scale_features"
FEATURE_SCHEMA = pa.schema([
    pa.field("person_id", pa.int64(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("concept_id", pa.int64(), nullable=False),
])
_SOURCES = {  # domain -> (table, date column, source value column, concept column)
    "condition": ("condition_occurrence", "condition_start_date", "condition_source_value", "condition_concept_id"),
    "drug": ("drug_exposure", "drug_exposure_start_date", "drug_source_value", "drug_concept_id"),
    "procedure": ("procedure_occurrence", "procedure_date", "procedure_source_value", "procedure_concept_id"),
}


def excluded_code_sets(protocol: StudyProtocol, domain: str) -> list[CodeSet]:
    """The code sets whose records in ``domain`` never become large-scale covariates: the
    arms' (a drug-era arm's ingredient concepts are matched on drug records' concept ids), the
    named condition covariates' and the restriction's."""
    arm_domains = {domain, "drug_era"} if domain == "drug" else {domain}
    sets = [arm.codes for arm in protocol.arms() if arm.domain in arm_domains]
    if domain == "condition":
        sets += [c.codes for c in protocol.covariates if c.kind == "condition"]
        if protocol.restrict_to is not None:
            sets.append(protocol.restrict_to.codes)
    return sets


def _excluded(protocol: StudyProtocol, domain: str, records: DataFrame, ancestors: DataFrame | None) -> Column:
    """True where a record of ``domain`` matches a code set of :func:`excluded_code_sets`,
    or carries a concept that such a record carries at this site."""
    matches = [
        code_predicate(F.col("code"), codes, F.col("concept_id"), resolve_concepts(codes, ancestors))
        for codes in excluded_code_sets(protocol, domain)
    ]
    matching = reduce(lambda a, b: a | b, matches, F.lit(False))
    carried = [int(row[0]) for row in records.where(matching).select("concept_id").distinct().collect()
               if row[0] is not None]
    return matching | F.col("concept_id").isin(carried) if carried else matching


def concept_features(protocol: StudyProtocol, tables: dict[str, DataFrame], cohort: DataFrame) -> DataFrame:
    """``person_id, domain, concept_id``: each cohort member's concepts in the window, distinct.

    ``cohort`` holds ``person_id`` and ``index_date`` (the analysis dataset); ``tables`` the
    study's inputs (site_agent/cohort/inputs.py lists the domains' tables).
    """
    block = protocol.large_scale_covariates
    if block is None:
        raise ValueError("concept_features needs a protocol with large_scale_covariates")  # guarded by the store
    window = protocol.large_scale_window()
    keys = cohort.select("person_id", "index_date")
    ancestors = tables.get("concept_ancestor")
    frames = []
    for domain in block.domains:
        table, date, code, concept = _SOURCES[domain]
        records = tables[table].select(
            "person_id", F.col(date).alias("date"), F.col(code).alias("code"), F.col(concept).alias("concept_id"),
        )
        offset = F.datediff(F.col("date"), F.col("index_date"))
        kept = (
            records.join(keys, "person_id")
            .where(F.col("concept_id").isNotNull() & (F.col("concept_id") != 0))
            .where((offset >= window.start_day) & (offset <= window.end_day))
            .where(~_excluded(protocol, domain, records, ancestors))
        )
        frames.append(kept.select(
            F.col("person_id").cast("long"), F.lit(domain).alias("domain"), F.col("concept_id").cast("long"),
        ).distinct())
    return reduce(DataFrame.unionByName, frames)
