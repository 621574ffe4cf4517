"""A site made of analysis rows in memory: the real partial computations and disclosure guard, no Spark.

For plan-level tests of the study logic on data a test shapes at will (separation, empty
arms, no events). The cohort builder and Spark are covered by tests that use SiteAgent.
With ``features`` (person, concept pairs) the site also answers for large-scale covariates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.errors import FedRWEError
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
from site_agent.secure_aggregation import SecureAggregation
from site_agent.settings import DisclosurePolicy


def rows_from_frame(frame: pd.DataFrame, columns: list[str]) -> AnalysisRows:
    frame = frame.sort_values("person_id")
    design = np.column_stack([np.ones(len(frame)), frame[columns].to_numpy(float)])
    return AnalysisRows(
        frame.person_id.to_numpy(np.int64), frame.treatment.to_numpy(float), frame.time.to_numpy(np.int64),
        frame.event.to_numpy(np.int64), design,
    )


class RowsSite:
    """Answers a study's rounds from in-memory rows, through the site's disclosure guard."""

    def __init__(
        self, site_id: str, rows: AnalysisRows, protocol: StudyProtocol, policy: DisclosurePolicy,
        features: ConceptFeatures | None = None, secure: SecureAggregation | None = None,
    ) -> None:
        self.site_id, self.rows, self.protocol, self.policy = site_id, rows, protocol, policy
        self.features = features
        self.secure = secure or SecureAggregation(site_id)  # keys and one-time masks, as the site agent keeps them
        self.table = weighted_event_table(rows.time, rows.treatment, rows.event, np.ones(len(rows.time))).table

    def rows_with(self, params: dict[str, object]) -> AnalysisRows:
        """The rows with the round's concept columns, as the site agent builds them."""
        concepts = params.get("concepts")
        if not concepts:
            return self.rows
        assert self.features is not None
        assert isinstance(concepts, list)
        return with_concepts(self.rows, self.features, concepts, self.policy.min_cell_count)

    def reply(self, request: RoundRequest) -> RoundReply:
        limit, cells = self.policy.max_abs_coefficient, self.policy.min_cell_count
        partials = {
            "provenance": lambda p: Release({
                "input_versions": {}, "dataset_version": 0, "event_tables_allowed": self.policy.event_tables,
            }),
            "attrition": lambda p: Release({"steps": []}),
            "arm_summary": lambda p: arm_summary(self.table),
            "crude_cox": lambda p: crude_cox(self.table, p, limit),
            "propensity": lambda p: propensity(self.rows_with(p), p, limit),
            "adjusted": lambda p: adjusted(self.rows_with(p), self.protocol, p, limit, cells,
                                           self.policy.event_tables and bool(p.get("event_tables", True))),
            "weighted_cox": lambda p: weighted_cox(self.rows_with(p["propensity"]), self.protocol, p, limit),
            KEY_TASK: lambda p: self.secure.key_release(request),
        }
        if self.features is not None:
            features, n = self.features, len(self.rows.person_id)
            partials["large_scale_concepts"] = lambda p: concept_counts(features, n, cells)
        try:
            self.secure.check(request, self.protocol, self.policy)
            results = guarded(lambda: compute_tasks(partials, request.tasks), self.policy, self.site_id).values
            results = self.secure.protect(request, results)
        except FedRWEError as error:
            return RoundReply(status="error", site_id=self.site_id, error=str(error))
        return RoundReply(status="ok", site_id=self.site_id, results=results)
