"""A site made of analysis rows in memory: the real partial computations and disclosure guard, no Spark.

For plan-level tests of the study logic on data a test shapes at will (separation, empty
arms, no events). The cohort builder and Spark are covered by tests that use SiteAgent.
With ``features`` (person, concept pairs) the site also answers for large-scale covariates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.errors import DisclosureRefused, FedRWEError
from shared.privacy.masked_tasks import KEY_TASK
from shared.protocol.messages import RoundReply, RoundRequest
from shared.protocol.model import StudyProtocol
from shared.stats.stratified_cox import weighted_event_table
from site_agent.analyses.adjusted import adjusted, weighted_cox
from site_agent.analyses.counts import arm_summary
from site_agent.analyses.cox import crude_cox
from site_agent.analyses.large_scale import ConceptFeatures, concept_counts, with_concepts
from site_agent.analyses.propensity import propensity
from site_agent.analyses.release import Release
from site_agent.analyses.rows import AnalysisRows
from site_agent.disclosure.guard import compute_tasks, guarded
from site_agent.disclosure.policy_checks import check_design, refused_task, restrict_parts
from site_agent.secure_aggregation import SecureAggregation
from site_agent.settings import DisclosurePolicy


def rows_from_frame(frame: pd.DataFrame, columns: list[str]) -> AnalysisRows:
    frame = frame.sort_values("person_id")
    design = np.column_stack([np.ones(len(frame)), frame[columns].to_numpy(float)])
    return AnalysisRows(
        frame.person_id.to_numpy(np.int64), frame.treatment.to_numpy(float), frame.time.to_numpy(np.int64),
        frame.event.to_numpy(np.int64), design,
    )


def _refuse(reason: str) -> Release:
    raise DisclosureRefused(reason)


class RowsSite:
    """Answers a study's rounds from in-memory rows, through the site's disclosure guard."""

    def __init__(
        self, site_id: str, rows: AnalysisRows, protocol: StudyProtocol, policy: DisclosurePolicy,
        features: ConceptFeatures | None = None, secure: SecureAggregation | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.site_id, self.rows, self.protocol, self.policy = site_id, rows, protocol, policy
        self.features = features
        self.secure = secure or SecureAggregation(site_id)  # keys and one-time masks, as the site agent keeps them
        self.rng = rng
        self.table = weighted_event_table(rows.time, rows.treatment, rows.event, np.ones(len(rows.time))).table

    def rows_with(self, params: dict[str, object]) -> AnalysisRows:
        """The rows with the round's concept columns, as the site agent builds them."""
        concepts = params.get("concepts")
        rows = self.rows
        if concepts:
            assert self.features is not None
            assert isinstance(concepts, list)
            rows = with_concepts(self.rows, self.features, concepts, self.policy.min_cell_count)
        names = ["intercept", *self.protocol.covariate_columns(), *(concepts or [])]  # type: ignore[misc]
        check_design("propensity", rows.design, names, self.policy, self.site_id)
        return rows

    def reply(self, request: RoundRequest) -> RoundReply:
        limit, cells = self.policy.max_abs_coefficient, self.policy.min_cell_count
        partials = {
            "provenance": lambda p: Release({
                "input_versions": {}, "dataset_version": 0, "event_tables_allowed": self.policy.event_tables,
                "time_grid": self.policy.time_grid,
            }),
            "attrition": lambda p: Release({"steps": []}),
            "arm_summary": lambda p: arm_summary(self.table),
            "crude_cox": lambda p: crude_cox(self.table, p, limit),
            "propensity": lambda p: propensity(self.rows_with(p), p, limit),
            "adjusted": lambda p: restrict_parts(adjusted(
                self.rows_with(p), self.protocol, p, limit, cells,
                self.policy.event_tables and bool(p.get("event_tables", True)), self.policy.grid_days(),
            ), self.policy, self.site_id),
            "weighted_cox": lambda p: restrict_parts(
                weighted_cox(self.rows_with(p["propensity"]), self.protocol, p, limit), self.policy, self.site_id,
            ),
            KEY_TASK: lambda p: self.secure.key_release(request),
        }
        if self.features is not None:
            features, n = self.features, len(self.rows.person_id)
            partials["large_scale_concepts"] = lambda p: concept_counts(features, n, cells)
        for name in list(partials):
            if (reason := refused_task(name, self.policy, self.site_id)) is not None:
                partials[name] = lambda p, reason=reason: _refuse(reason)  # type: ignore[misc]
        try:
            self.secure.check(request, self.protocol, self.policy)
            results = guarded(
                lambda: compute_tasks(partials, request.tasks), self.policy, self.site_id, self.rng,
            ).values
            results = self.secure.protect(request, results)
        except FedRWEError as error:
            return RoundReply(status="error", site_id=self.site_id, error=str(error))
        return RoundReply(status="ok", site_id=self.site_id, results=results)
