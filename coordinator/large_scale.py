"""Central half of the large-scale covariates: the common concept list, and the PS fit that uses it.

The site half is site_agent/analyses/large_scale.py. Rule (docs/estimators.md):

* a concept enters the model only if **every** site released it in the summary round, i.e.
  at every site at least ``min_cell_count`` cohort members have it and at least as many
  do not. Each site's gradient and Hessian then rest only on columns that cleared its own
  minimum, and a concept common at one hospital but rare at another stays out;
* the concepts are ordered by their number of persons over all sites (descending), ties
  by column name, and the first ``max_covariates`` are kept: the order is deterministic,
  so every run of a study over the same data fits the same model.

The columns are known only after the summary round, so the propensity model starts one
exchange later than without large-scale covariates (its warm start comes in round 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from coordinator.fits import Partials, PropensityFit
from shared.protocol.model import StudyProtocol

CONCEPT_TASK = "large_scale_concepts"
SMD_THRESHOLD = 0.1  # the usual cut-off for a covariate out of balance


@dataclass(frozen=True)
class ConceptSelection:
    """The concepts in the model and how many each site released."""

    columns: list[str]
    persons: dict[str, int]  # persons with each selected concept, over all sites
    released_by_site: dict[str, int]
    released_somewhere: int
    released_everywhere: int
    max_covariates: int

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": "concepts released by every site (>= its min_cell_count persons with and without), "
                    f"most persons over all sites first, at most {self.max_covariates}",
            "n_selected": len(self.columns),
            "released_everywhere": self.released_everywhere,
            "released_somewhere": self.released_somewhere,
            "released_by_site": self.released_by_site,
            "columns": self.columns,
        }


def select_concepts(site_ids: list[str], releases: list[dict[str, Any]], max_covariates: int) -> ConceptSelection:
    """The common concept list from every site's ``large_scale_concepts`` release (site order)."""
    per_site = [{str(c): int(n) for c, n in release["persons"].items()} for release in releases]
    everywhere = set.intersection(*(set(p) for p in per_site)) if per_site else set()
    somewhere = set().union(*(set(p) for p in per_site))
    total = {column: sum(p[column] for p in per_site) for column in everywhere}
    ordered = sorted(everywhere, key=lambda column: (-total[column], column))[:max_covariates]
    return ConceptSelection(
        columns=ordered, persons={c: total[c] for c in ordered},
        released_by_site={site: len(p) for site, p in zip(site_ids, per_site, strict=True)},
        released_somewhere=len(somewhere), released_everywhere=len(everywhere), max_covariates=max_covariates,
    )


class LargeScalePropensityFit(PropensityFit):
    """The propensity model on the named covariates plus the selected concepts.

    Waits for the summary round's selection (:meth:`choose`); its first round then asks for
    the derivatives at 0 and each site's own fit (the warm start), as round 1 does for a
    model without large-scale covariates. Every request names the concept columns, so a
    site builds the same design in every round.
    """

    def __init__(self, protocol: StudyProtocol) -> None:
        super().__init__(protocol)
        self.named = list(self.columns)
        self.max_covariates = protocol.large_scale_covariates.max_covariates if protocol.large_scale_covariates else 0
        self.selection: ConceptSelection | None = None
        self.started = False

    def choose(self, selection: ConceptSelection) -> None:
        """Fix the model's columns: named covariates first, then the selected concepts."""
        self.selection = selection
        self.columns = [*self.named, *selection.columns]
        self.beta = np.zeros(len(self.columns))

    def concept_params(self) -> dict[str, Any]:
        """The part of every propensity-score request that names the concept columns."""
        return {"concepts": list(self.selection.columns)} if self.selection is not None else {}

    def first_params(self) -> dict[str, Any]:
        return {**super().first_params(), **self.concept_params()}

    def next_params(self) -> dict[str, Any]:
        if not self.started:
            return self.first_params()
        return {**super().next_params(), **self.concept_params()}

    def absorb(self, partials: Partials) -> None:
        if not self.started:  # the derivatives at 0 and the sites' own fits
            self.started = True
            self.warm_start(partials)
            return
        super().absorb(partials)

    def result(self) -> dict[str, Any]:
        result = super().result()
        result["model"] = "logistic regression of treatment on the protocol's covariates and large-scale concepts"
        if self.selection is not None:
            result["large_scale_covariates"] = self.selection.to_json()
        return result


def propensity_fit_for(protocol: StudyProtocol) -> PropensityFit:
    """The propensity fit the protocol asks for."""
    return LargeScalePropensityFit(protocol) if protocol.large_scale_covariates is not None else PropensityFit(protocol)


def waits_for_selection(fit: object) -> bool:
    """True for a propensity fit whose columns come from the summary round (not in round 1)."""
    return isinstance(fit, LargeScalePropensityFit) and not fit.started


def concept_params(fit: PropensityFit | None) -> dict[str, Any]:
    """``{"concepts": [...]}`` for requests that evaluate the PS model, when it has concepts."""
    return fit.concept_params() if isinstance(fit, LargeScalePropensityFit) else {}


def concept_columns(fit: PropensityFit | None) -> list[str]:
    """The concept columns of the fitted model ([] without large-scale covariates)."""
    return list(fit.selection.columns) if isinstance(fit, LargeScalePropensityFit) and fit.selection else []


def concept_balance(smd: dict[str, NDArray[np.float64] | None], columns: list[str]) -> dict[str, Any]:
    """Balance of the concept covariates per label ('before', each analysis): max |SMD| and more."""
    out: dict[str, Any] = {"n_covariates": len(columns), "max_abs_smd": {}, "max_abs_smd_column": {},
                           f"n_abs_smd_above_{SMD_THRESHOLD}": {}, "smd": {column: {} for column in columns}}
    for label, values in smd.items():
        if values is None or not len(columns):
            out["max_abs_smd"][label] = None if values is None else 0.0
            continue
        worst = int(np.argmax(np.abs(values)))
        out["max_abs_smd"][label] = float(abs(values[worst]))
        out["max_abs_smd_column"][label] = columns[worst]
        out[f"n_abs_smd_above_{SMD_THRESHOLD}"][label] = int(np.sum(np.abs(values) > SMD_THRESHOLD))
        for column, value in zip(columns, values.tolist(), strict=True):
            out["smd"][column][label] = value
    return out
