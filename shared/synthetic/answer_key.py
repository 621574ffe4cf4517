"""The cohort rules of docs/cohort_rules.md applied to the generator's own arrays.

This is the answer key the site agent's cohort builder is tested against. It works on
the planted per-person facts (``CudPersons``, ``AntidepressantStarters``), not on the
written tables, so it is an independent derivation; ``tests/test_synthetic.py``
re-derives the same numbers from the Delta tables with pandas.

Rules and their order (attrition is counted after each):
  1 entry, 2 arm (index and arm), 3 washout, 4 age, 5 no_prior_outcome, 6 time_at_risk.
Rule 7 gives ``event``/``time``, rule 8 the covariates (summed per arm).

Two comparisons of the reference protocol (studies/ketamine_cud_reference.yaml):
- A (``vs_anaesthetics``, studies/ketamine_cud.yaml): ketamine vs other anaesthetics at
  the anaesthesia of the CUD blocks; the antidepressant starters enter (rule 1) only.
- B1 (``vs_antidepressants``): ketamine vs antidepressants, restricted to persons with a
  depression code on or before index (the step ``restriction``, after ``arm``). Its
  exposed are comparison A's; its comparators are the antidepressant starters. The
  restriction is read off the block's depression records (on any day up to index), the
  only fact of B1 that ``persons.py`` does not decide alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shared.synthetic.antidepressants import AntidepressantStarters
from shared.synthetic.days import Days, calendar_year
from shared.synthetic.events import Records
from shared.synthetic.model import AGE_REFERENCE, COVARIATES
from shared.synthetic.persons import EDGE, Bools, CudPersons, Demographics, Floats, Ints
from shared.synthetic.vocabulary import COVARIATE_CODES, code_index

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
RESTRICTED_RULES: tuple[str, ...] = ("arm", "restriction", *RULES[1:])
DEPRESSION_CODES = code_index(COVARIATE_CODES["depression"])


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


class IndexedBlock(Protocol):
    """The per-person facts rules 3-8 read, for a block whose persons have an index date."""

    @property
    def size(self) -> int:
        """Number of persons."""

    @property
    def demographics(self) -> Demographics:
        """Birth year (rule 4) and the demographic covariates."""

    @property
    def index(self) -> Days:
        """Index date."""

    @property
    def observation_start(self) -> Days:
        """Start of observation."""

    @property
    def observation_end(self) -> Days:
        """End of observation."""

    @property
    def death(self) -> Days:
        """Death date (a far future day when alive)."""

    @property
    def prior_remission(self) -> Days:
        """A remission code before index (a far future day when none)."""

    @property
    def remission_treated(self) -> Ints:
        """Potential remission day after index under ketamine."""

    @property
    def remission_untreated(self) -> Ints:
        """Potential remission day after index under the comparator."""

    def design_matrix(self) -> Floats:
        """Rule 8's covariates, age centred."""


def _cohort(
    block: IndexedBlock, exposed: Bools, comparator: Bools, selection: dict[str, Bools]
) -> BlockCohort:
    """Rules 3-8 after the selection steps (``arm``, maybe ``restriction``) of rule 2.

    The exposed's remission is their potential time under ketamine, everyone else's the
    one under a comparator.
    """
    index = block.index
    censor_day = np.minimum.reduce(
        [
            np.full_like(index, TIME_AT_RISK_END),
            block.observation_end - index,
            block.death - index,
        ]
    )
    age = calendar_year(index) - block.demographics.year_of_birth
    passes = {
        **selection,
        "washout": (block.observation_start <= index)
        & (index <= block.observation_end)
        & (index - block.observation_start >= WASHOUT_DAYS),
        "age": age >= MIN_AGE,
        "no_prior_outcome": block.prior_remission >= index,
        "time_at_risk": censor_day >= TIME_AT_RISK_START,
    }
    keep = np.ones(block.size, dtype=bool)
    attrition: dict[str, tuple[int, int]] = {}
    for rule, passed in passes.items():
        keep &= passed
        attrition[rule] = (int((keep & exposed).sum()), int((keep & comparator).sum()))

    remission = np.where(exposed, block.remission_treated, block.remission_untreated)
    event = (remission >= TIME_AT_RISK_START) & (remission <= censor_day)
    time = np.where(event, remission, censor_day)
    covariates = block.design_matrix()
    covariates[:, COVARIATES.index("age")] += AGE_REFERENCE
    rows = CohortRows(
        exposed=exposed[keep],
        time=time[keep],
        event=event[keep],
        covariates=covariates[keep],
        remission_treated=block.remission_treated[keep],
        remission_untreated=block.remission_untreated[keep],
    )
    return BlockCohort(n_cud=block.size, attrition=attrition, rows=rows)


def _ketamine_arm(persons: CudPersons) -> Bools:
    """Rule 2's exposed among CUD patients: ketamine at the anaesthesia (the first
    ketamine on or after entry; a later ketamine only follows it)."""
    exposed: Bools = persons.anaesthesia & persons.ketamine_at_index
    return exposed


def _depression_on_or_before_index(block: IndexedBlock, conditions: Records) -> Bools:
    """B1's restriction: a depression code on any day up to and including index."""
    hit = np.isin(conditions.value, DEPRESSION_CODES)
    hit &= conditions.day <= block.index[conditions.person]
    having = np.zeros(block.size, dtype=bool)
    having[conditions.person[hit]] = True
    return having


def apply_cohort_rules(persons: CudPersons) -> BlockCohort:
    """Apply comparison A's rules 1-8 to a block of CUD patients (all have an entry code)."""
    # Rule 2: exposed = ketamine on/after entry; comparator = comparator on/after entry and
    # ketamine on no date. The index drug is the first anaesthetic on/after entry; patients
    # given ketamine before entry get a comparator at index and qualify for neither arm.
    ketamine_before_entry = persons.edge_case == EDGE["ketamine_before_entry"]
    exposed = _ketamine_arm(persons)
    comparator = persons.anaesthesia & ~persons.ketamine_at_index & ~ketamine_before_entry
    return _cohort(persons, exposed, comparator, {"arm": exposed | comparator})


def apply_cohort_rules_to_starters(starters: AntidepressantStarters) -> BlockCohort:
    """Comparison A's rules on antidepressant starters: they enter (rule 1), and no more
    (no anaesthetic, no ketamine on or after entry)."""
    nobody = np.zeros(starters.size, dtype=bool)
    return _cohort(starters, nobody, nobody, {"arm": nobody})


def apply_antidepressant_rules(persons: CudPersons, conditions: Records) -> BlockCohort:
    """Comparison B1's rules on a block of CUD patients: the ketamine patients are its
    exposed (same index as in A); no CUD patient has an antidepressant, so none is a
    comparator."""
    exposed = _ketamine_arm(persons)
    comparator = np.zeros(persons.size, dtype=bool)
    restriction = _depression_on_or_before_index(persons, conditions)
    return _cohort(persons, exposed, comparator, {"arm": exposed, "restriction": restriction})


def apply_antidepressant_rules_to_starters(
    starters: AntidepressantStarters, conditions: Records
) -> BlockCohort:
    """Comparison B1's rules on antidepressant starters: all are comparators at their
    first antidepressant but the ``ketamine_before_entry`` edge case (never exposed fails)."""
    exposed = np.zeros(starters.size, dtype=bool)
    comparator = starters.edge_case != EDGE["ketamine_before_entry"]
    restriction = _depression_on_or_before_index(starters, conditions)
    return _cohort(starters, exposed, comparator, {"arm": comparator, "restriction": restriction})


@dataclass
class SiteCohortTally:
    """Running totals of one site's answer key (of one comparison) over its blocks."""

    rules: tuple[str, ...] = RULES
    n_cud: int = 0
    attrition: dict[str, list[int]] = field(default_factory=dict)
    blocks: list[CohortRows] = field(default_factory=list)

    def __post_init__(self) -> None:
        for rule in self.rules:
            self.attrition.setdefault(rule, [0, 0])

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
