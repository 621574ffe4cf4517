"""Comparison B1's planted comparator: CUD patients with depression starting an antidepressant.

The reference protocol (studies/ketamine_cud_reference.yaml) compares, among CUD patients
with depression, ketamine with antidepressants (``vs_antidepressants``). Its exposed arm is
the ketamine patients of the CUD blocks (comparison A's exposed, with depression on or
before index), whose remission hazard from index is ``lambda_site * exp(beta + delta'x)``.
This module plants the comparator arm as a block of persons of its own:

- a CUD entry code, then, 0-1500 days later, the first antidepressant (index): an
  outpatient visit with one of ``ANTIDEPRESSANTS``, refills of it after, sometimes a
  switch to another one, and for a few an earlier course before the CUD diagnosis;
- covariates drawn as for the CUD patients (the site's prevalences, one latent severity),
  except depression: recorded in the covariate window ``[index-365, index-1]``, or, for
  ``DIAGNOSED_AT_START`` of them, first on the index day (the visit that starts the
  antidepressant). Every covariate is written as the cohort rules measure it (true:
  records in the window; false: records outside it only), as ``events.py`` does for
  anaesthesia patients;
- remission hazard ``lambda_site * exp(delta'x)`` from index (the planted model of
  ``model.py`` without the ketamine term), and no other remission code: no natural
  history, so the planted hazard is the whole story;
- the edge cases of the anaesthesia patients (``model.EDGE_CASES``), each failing one rule
  of comparison B1; ``ketamine_before_entry`` is a ketamine infusion for depression
  before the CUD diagnosis, which makes the person neither exposed nor comparator;
- never an anaesthetic (so comparison A's arms do not change: these persons only add to
  its entry count), and never ketamine on or after entry.

Why some have depression only on the index day: B1 keeps persons with depression on or
before index and leaves the covariate out, but about 8% of its ketamine patients have it
only outside the covariate window (depression = 0 in their hazard). Starters with the
same share keep that omitted covariate balanced between the arms, so B1's adjusted
estimates aim at the planted HR (up to the small non-collapsibility of leaving out a
prognostic covariate).

Confounding comes with the design: the ketamine patients were chosen by the anaesthesia
propensity model (more pain, PTSD, anxiety, ER visits, younger), these persons were not,
and the same covariates raise remission, so the crude HR of B1 overstates ``exp(beta)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from shared import omop
from shared.synthetic.days import Days, calendar_year, uniform_day
from shared.synthetic.events import (
    EDGE_RECORD_PROBABILITY,
    KETAMINE_CODE,
    NOISE_PROBABILITY,
    BlockRecords,
    _Collector,
    _covariate_code,
    _outside_window,
    _remission_code,
    _routine,
    _weighted,
    _with_stays,
    cud_diagnoses,
)
from shared.synthetic.model import (
    CONDITION_COVARIATES,
    FIRST_ENTRY,
    LAST_ENTRY,
    PlantedModel,
    SiteParameters,
)
from shared.synthetic.persons import (
    EDGE,
    NO_DAY,
    Bools,
    Demographics,
    Floats,
    Ints,
    _conditions,
    _demographics,
    _edge_cases,
    _index_offset,
    _observation_end_and_death,
    _observation_start,
    _potential_remission,
    design_matrix,
)
from shared.synthetic.vocabulary import (
    ANTIDEPRESSANT_WEIGHTS,
    ANTIDEPRESSANTS,
    ENTRY_CODE_WEIGHTS,
    code_index,
)

DEPRESSION = CONDITION_COVARIATES.index("depression")
ANTIDEPRESSANT_CODES = code_index(ANTIDEPRESSANTS)
DIAGNOSED_AT_START = 0.08  # depression first recorded on the index day (see above)
EARLIER_COURSE_PROBABILITY = 0.05  # an antidepressant before the CUD diagnosis
SWITCH_PROBABILITY = 0.15  # a later course of another antidepressant
MEAN_REFILLS = 3.0


@dataclass(frozen=True)
class AntidepressantStarters:
    """A block of CUD patients with depression who start an antidepressant on ``index``."""

    demographics: Demographics
    entry: Days  # first CUD diagnosis
    entry_code: Ints
    conditions: Bools  # (n, len(CONDITION_COVARIATES)) in the covariate window
    emergency_visits: Ints  # ER visits in the covariate window
    edge_case: Ints  # EDGE_CASES code
    index: Days  # first antidepressant on or after entry
    antidepressant: Ints  # which of ANTIDEPRESSANTS is started
    observation_start: Days
    observation_end: Days
    death: Days  # NO_DAY when alive
    prior_remission: Days  # NO_DAY unless edge case prior_remission
    remission_treated: Ints  # potential remission day after index had ketamine been given
    remission_untreated: Ints  # ... under the antidepressant (the one observed)

    @property
    def size(self) -> int:
        """Number of persons in the block."""
        return len(self.entry)

    @property
    def last_day(self) -> Days:
        """Last day a record can carry: end of observation or death, whichever is first."""
        return np.minimum(self.observation_end, self.death)

    def design_matrix(self) -> Floats:
        """Covariates in ``COVARIATES`` order as rule 8 measures them at the index date."""
        return design_matrix(
            self.demographics, calendar_year(self.index), self.conditions, self.emergency_visits
        )


def simulate_antidepressant_starters(
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, n: int
) -> AntidepressantStarters:
    """Simulate ``n`` antidepressant starters of ``site`` (see the module docstring).

    Every person has an index date, so the CUD patients' helpers for persons with an
    anaesthesia (index offset, observation, death, edge cases) apply with all true.
    """
    entry = rng.integers(FIRST_ENTRY, LAST_ENTRY + 1, n)
    entry_code = rng.choice(len(ENTRY_CODE_WEIGHTS), size=n, p=ENTRY_CODE_WEIGHTS).astype(np.int64)
    demo = _demographics(rng, site, model, entry)
    severity = rng.normal(0.0, 1.0, n)
    conditions = _conditions(rng, site, model, severity, 1.0)
    conditions[:, DEPRESSION] = rng.random(n) >= DIAGNOSED_AT_START
    emergency_visits = rng.poisson(site.emergency_visit_rate * np.exp(0.4 * severity - 0.08))

    has_index = np.ones(n, dtype=bool)
    edge = _edge_cases(rng, model, has_index)
    index = entry + _index_offset(rng, entry, edge)
    minor = edge == EDGE["minor"]
    year_of_birth = np.where(
        minor, calendar_year(index) - rng.integers(14, 18, n), demo.year_of_birth
    )
    demo = dataclasses.replace(demo, year_of_birth=year_of_birth)
    x = design_matrix(demo, calendar_year(index), conditions, emergency_visits)
    remission_treated, remission_untreated = _potential_remission(rng, site, model, x)

    start = _observation_start(rng, entry, index, has_index, edge)
    end, death = _observation_end_and_death(rng, model, entry, index, has_index, edge)
    prior = edge == EDGE["prior_remission"]
    prior_remission = np.where(
        prior, uniform_day(rng, entry + 1, np.where(prior, index - 1, entry + 1)), NO_DAY
    )
    return AntidepressantStarters(
        demographics=demo,
        entry=entry,
        entry_code=entry_code,
        conditions=conditions,
        emergency_visits=emergency_visits,
        edge_case=edge,
        index=index,
        antidepressant=_weighted(rng, np.arange(len(ANTIDEPRESSANTS)), ANTIDEPRESSANT_WEIGHTS, n),
        observation_start=start,
        observation_end=end,
        death=death,
        prior_remission=prior_remission,
        remission_treated=remission_treated,
        remission_untreated=remission_untreated,
    )


def _covariates(
    rng: np.random.Generator, p: AntidepressantStarters, conditions: _Collector, visits: _Collector
) -> None:
    """Covariate codes and ER visits exactly as rule 8 must measure them at index.

    A true covariate has 1+ records in ``[index-365, index-1]``; depression, where false,
    a record on the index day; any covariate may also have records outside the window,
    on its edges (day -366, day 0) too; the person's ``emergency_visits`` are the only ER
    visits in the window.
    """
    everyone = np.arange(p.size)
    start, last, index = p.observation_start, p.last_day, p.index
    window_first = np.maximum(start, index - 365)
    person, covariate = np.nonzero(p.conditions)
    repeats = 1 + rng.poisson(0.4, len(person))
    person, covariate = np.repeat(person, repeats), np.repeat(covariate, repeats)
    day = uniform_day(rng, window_first[person], index[person] - 1)
    conditions.add(person, day, _covariate_code(rng, covariate))
    at_start = np.flatnonzero(~p.conditions[:, DEPRESSION])
    conditions.add(
        at_start, index[at_start], _covariate_code(rng, np.full(len(at_start), DEPRESSION))
    )
    person, covariate = np.nonzero(rng.random(p.conditions.shape) < NOISE_PROBABILITY)
    day = _outside_window(rng, person, start, index, last)
    conditions.add(person, day, _covariate_code(rng, covariate))
    for edge_day in (index - 366, index):
        person = everyone[rng.random(p.size) < EDGE_RECORD_PROBABILITY]
        day = np.where(edge_day[person] >= start[person], edge_day[person], index[person])
        covariate = rng.integers(0, len(CONDITION_COVARIATES), len(person))
        conditions.add(person, day, _covariate_code(rng, covariate))

    person = np.repeat(everyone, p.emergency_visits)
    visits.add(
        person, uniform_day(rng, window_first[person], index[person] - 1), omop.VISIT_EMERGENCY
    )
    person = np.repeat(everyone, rng.poisson(0.7, p.size))
    visits.add(person, _outside_window(rng, person, start, index, last), omop.VISIT_EMERGENCY)


def _antidepressants(
    rng: np.random.Generator, p: AntidepressantStarters, visits: _Collector, drugs: _Collector
) -> None:
    """The start at an outpatient visit on index, monthly refills, a switch, earlier courses.

    Nothing falls between entry and index: the start is the first antidepressant on or
    after entry. An earlier course lies before the CUD diagnosis (rule 2 ignores it).
    """
    n, everyone, last = p.size, np.arange(p.size), p.last_day
    start_code = ANTIDEPRESSANT_CODES[p.antidepressant]
    drugs.add(everyone, p.index, start_code, visits.add(everyone, p.index, omop.VISIT_OUTPATIENT))

    person = np.repeat(everyone, rng.poisson(MEAN_REFILLS, n))
    month = np.arange(len(person)) - np.searchsorted(person, person, side="left") + 1
    day = p.index[person] + 30 * month + rng.integers(-3, 4, len(person))
    refilled = day <= last[person]
    drugs.add(person[refilled], day[refilled], start_code[person[refilled]])

    switch = everyone[(rng.random(n) < SWITCH_PROBABILITY) & (p.index < last)]
    day = uniform_day(rng, p.index[switch] + 1, last[switch])
    other = (p.antidepressant[switch] + rng.integers(1, len(ANTIDEPRESSANTS), len(switch))) % len(
        ANTIDEPRESSANTS
    )
    position = visits.add(switch, day, omop.VISIT_OUTPATIENT)
    drugs.add(switch, day, ANTIDEPRESSANT_CODES[other], position)

    room = p.observation_start < p.entry
    earlier = everyone[room & (rng.random(n) < EARLIER_COURSE_PROBABILITY)]
    day = uniform_day(rng, p.observation_start[earlier], p.entry[earlier] - 1)
    code = _weighted(rng, ANTIDEPRESSANT_CODES, ANTIDEPRESSANT_WEIGHTS, len(earlier))
    drugs.add(earlier, day, code)


def _ketamine_before_entry(
    rng: np.random.Generator, p: AntidepressantStarters, visits: _Collector, drugs: _Collector
) -> None:
    """The edge case's ketamine infusion (for depression) at a visit before the CUD entry."""
    person = np.flatnonzero(p.edge_case == EDGE["ketamine_before_entry"])
    day = uniform_day(rng, p.observation_start[person], p.entry[person] - 1)
    drugs.add(person, day, KETAMINE_CODE, visits.add(person, day, omop.VISIT_OUTPATIENT))


def _remissions(
    rng: np.random.Generator, p: AntidepressantStarters, conditions: _Collector
) -> None:
    """The planted remission after index (if observed), sometimes repeated, and the
    ``prior_remission`` edge case's code before index; nothing else."""
    day = p.index + p.remission_untreated
    person = np.flatnonzero(day <= p.last_day)
    day = day[person]
    conditions.add(person, day, _remission_code(rng, day))
    again = rng.random(len(person)) < 0.3
    person, day = person[again], day[again] + rng.integers(1, 181, int(again.sum()))
    keep = day <= p.last_day[person]
    conditions.add(person[keep], day[keep], _remission_code(rng, day[keep]))
    person = np.flatnonzero(p.prior_remission < p.index)
    day = p.prior_remission[person]
    conditions.add(person, day, _remission_code(rng, day))


def antidepressant_records(rng: np.random.Generator, p: AntidepressantStarters) -> BlockRecords:
    """All condition, visit and drug records of a block of antidepressant starters."""
    conditions, visits, drugs = _Collector(), _Collector(), _Collector()
    cud_diagnoses(rng, p, conditions)
    _covariates(rng, p, conditions, visits)
    _routine(rng, conditions, visits, drugs, p.observation_start, p.last_day, np.zeros(p.size))
    _remissions(rng, p, conditions)
    _antidepressants(rng, p, visits, drugs)
    _ketamine_before_entry(rng, p, visits, drugs)
    visit_records = _with_stays(rng, visits.collect(), p.last_day)
    return BlockRecords(conditions.collect(), visit_records, drugs.collect())
