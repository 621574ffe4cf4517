"""The cohort rules of docs/cohort_rules.md applied to the generator's own arrays.

This is the answer key the site agent's cohort builder is tested against. It works on
the planted per-person facts (``CudPersons``), not on the written tables, so it is an
independent derivation; ``tests/test_synthetic.py`` re-derives the same numbers from the
Delta tables with pandas.

Rules and their order (attrition is counted after each):
  1 entry, 2 arm (index and arm), 3 washout, 4 age, 5 no_prior_outcome, 6 time_at_risk.
Rule 7 gives ``event``/``time``, rule 8 the covariates (summed per arm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.synthetic.days import calendar_year
from shared.synthetic.model import AGE_REFERENCE, COVARIATES
from shared.synthetic.persons import EDGE, Bools, CudPersons, Floats, Ints

WASHOUT_DAYS = 365
MIN_AGE = 18
TIME_AT_RISK_START = 1
TIME_AT_RISK_END = 365
RULES: tuple[str, ...] = (
    "arm",
    "washout",
    "age",
    "no_prior_outcome",
    "time_at_risk",
)


@dataclass(frozen=True)
class CohortRows:
    """Analysis rows (one per person who passes every rule), as the rules define them."""

    exposed: Bools
    time: Ints
    event: Bools
    covariates: Floats  # COVARIATES order, age in years (not centred)
    remission_treated: Ints  # potential outcomes, for the effect in the treated
    remission_untreated: Ints


@dataclass(frozen=True)
class BlockCohort:
    """What the rules give on one block: arm counts after each rule and the final rows."""

    n_cud: int
    attrition: dict[str, tuple[int, int]]  # rule -> (n_exposed, n_comparator) after it
    rows: CohortRows


def apply_cohort_rules(persons: CudPersons) -> BlockCohort:
    """Apply rules 1-8 to a block of CUD patients (every one has an entry code)."""
    anaesthesia = persons.anaesthesia
    # Rule 2: exposed = ketamine on/after entry; comparator = comparator on/after entry and
    # ketamine on no date. The index drug is the first anaesthetic on/after entry; patients
    # given ketamine before entry get a comparator at index and qualify for neither arm.
    ketamine_before_entry = persons.edge_case == EDGE["ketamine_before_entry"]
    exposed = anaesthesia & persons.ketamine_at_index
    comparator = anaesthesia & ~persons.ketamine_at_index & ~ketamine_before_entry
    index = persons.index
    censor_day = np.minimum.reduce(
        [
            np.full_like(index, TIME_AT_RISK_END),
            persons.observation_end - index,
            persons.death - index,
        ]
    )
    age = calendar_year(index) - persons.demographics.year_of_birth
    passes = {
        "arm": exposed | comparator,
        "washout": (persons.observation_start <= index)
        & (index <= persons.observation_end)
        & (index - persons.observation_start >= WASHOUT_DAYS),
        "age": age >= MIN_AGE,
        "no_prior_outcome": persons.prior_remission >= index,
        "time_at_risk": censor_day >= TIME_AT_RISK_START,
    }
    keep = np.ones(persons.size, dtype=bool)
    attrition: dict[str, tuple[int, int]] = {}
    for rule in RULES:
        keep &= passes[rule]
        attrition[rule] = (int((keep & exposed).sum()), int((keep & comparator).sum()))

    remission = persons.remission_observed
    event = (remission >= TIME_AT_RISK_START) & (remission <= censor_day)
    time = np.where(event, remission, censor_day)
    covariates = persons.design_matrix()
    covariates[:, COVARIATES.index("age")] += AGE_REFERENCE
    rows = CohortRows(
        exposed=exposed[keep],
        time=time[keep],
        event=event[keep],
        covariates=covariates[keep],
        remission_treated=persons.remission_treated[keep],
        remission_untreated=persons.remission_untreated[keep],
    )
    return BlockCohort(n_cud=persons.size, attrition=attrition, rows=rows)


@dataclass
class SiteCohortTally:
    """Running totals of one site's answer key over its blocks."""

    n_cud: int = 0
    attrition: dict[str, list[int]] = field(default_factory=lambda: {r: [0, 0] for r in RULES})
    blocks: list[CohortRows] = field(default_factory=list)

    def add(self, block: BlockCohort) -> None:
        """Add one block's counts and rows."""
        self.n_cud += block.n_cud
        for rule, (n_exposed, n_comparator) in block.attrition.items():
            self.attrition[rule][0] += n_exposed
            self.attrition[rule][1] += n_comparator
        self.blocks.append(block.rows)

    def rows(self) -> CohortRows:
        """All analysis rows of the site so far."""
        parts = self.blocks
        return CohortRows(
            exposed=np.concatenate([p.exposed for p in parts]),
            time=np.concatenate([p.time for p in parts]),
            event=np.concatenate([p.event for p in parts]),
            covariates=np.concatenate([p.covariates for p in parts]),
            remission_treated=np.concatenate([p.remission_treated for p in parts]),
            remission_untreated=np.concatenate([p.remission_untreated for p in parts]),
        )
