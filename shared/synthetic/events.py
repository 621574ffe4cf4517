"""Records (conditions, visits, drugs, deaths) that make a block's planted facts true.

Every record of a CUD patient lies inside their observation period and not after death.
Facts the cohort rules read are written exactly:
- the first entry code is on the entry date; later CUD codes follow it;
- an anaesthesia visit on the index date carries the arm drug (ketamine or a comparator),
  sometimes with a second anaesthetic and fentanyl; comparator patients never get
  ketamine; other anaesthetics happen only after index or before entry;
- a covariate that is true has a record in the 365 days before index, a false one has
  records only outside that window (often on day -366 or day 0, the edges);
- the ER visits counted by ``emergency_visits`` are the only ER visits in the window;
- the first remission code after index is on ``index + remission day`` when it is
  inside observation; only the ``prior_remission`` edge case has one before index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shared import omop
from shared.synthetic.days import Days, uniform_day
from shared.synthetic.model import F14_91_FIRST_DAY
from shared.synthetic.persons import EDGE, BackgroundPersons, CudPersons, Ints
from shared.synthetic.vocabulary import (
    COMPARATOR_DRUGS,
    COMPARATOR_WEIGHTS,
    COVARIATE_CODES,
    ENTRY_CODE_WEIGHTS,
    ENTRY_CODES,
    FENTANYL,
    KETAMINE,
    OTHER_CONDITION_CODES,
    OTHER_DRUGS,
    REMISSION_CODES,
    code_index,
)

ENTRY = code_index(ENTRY_CODES)
REMISSION = code_index(REMISSION_CODES)
OTHER_CONDITIONS = code_index(OTHER_CONDITION_CODES)
OTHER_MEDICATIONS = code_index(OTHER_DRUGS)
COMPARATORS = code_index(COMPARATOR_DRUGS)
KETAMINE_CODE = int(code_index([KETAMINE])[0])
FENTANYL_CODE = int(code_index([FENTANYL])[0])
PROPOFOL_CODE, MIDAZOLAM_CODE = int(COMPARATORS[0]), int(COMPARATORS[1])
_COVARIATE_FIRST: Ints = np.array([code_index(c)[0] for c in COVARIATE_CODES.values()])
_COVARIATE_COUNT: Ints = np.array([len(c) for c in COVARIATE_CODES.values()])
if any(  # pragma: no cover - guards edits of the vocabulary
    not np.array_equal(code_index(c), first + np.arange(len(c)))
    for c, first in zip(COVARIATE_CODES.values(), _COVARIATE_FIRST, strict=True)
):
    raise RuntimeError("covariate codes must be contiguous in SOURCE_CODES")

NO_LINK = -1
NOISE_PROBABILITY = 0.12  # chance of a covariate record outside the window, per covariate
EDGE_RECORD_PROBABILITY = 0.06  # chance of a record exactly on day -366 / day 0


@dataclass(frozen=True)
class Records:
    """One table's records for a block: block-local person, days, and a value.

    ``value`` is a code number (conditions, drugs) or a visit concept id (visits);
    ``link`` is, for drugs, the position of their visit among the block's visits.
    """

    person: Ints
    day: Days
    end_day: Days
    value: Ints
    link: Ints


@dataclass(frozen=True)
class BlockRecords:
    """Everything written for one block besides the person and observation rows."""

    conditions: Records
    visits: Records
    drugs: Records


class _Collector:
    """Appends record arrays and concatenates them once."""

    def __init__(self) -> None:
        self._parts: list[tuple[Ints, Days, Ints, Ints]] = []
        self.size = 0

    def add(self, person: Ints, day: Days, value: Ints | int, link: Ints | None = None) -> Ints:
        """Add records; returns their positions in the collected arrays."""
        n = len(person)
        values = np.broadcast_to(np.asarray(value, dtype=np.int64), (n,))
        links = np.full(n, NO_LINK, dtype=np.int64) if link is None else link
        self._parts.append((person.astype(np.int64), day.astype(np.int64), values, links))
        positions = np.arange(self.size, self.size + n, dtype=np.int64)
        self.size += n
        return positions

    def collect(self) -> Records:
        """The records added so far, in order of addition."""
        if not self._parts:
            empty = np.zeros(0, dtype=np.int64)
            return Records(empty, empty, empty, empty, empty)
        person, day, value, link = (np.concatenate(c) for c in zip(*self._parts, strict=True))
        return Records(person, day, day, value, link)


def _with_stays(rng: np.random.Generator, visits: Records, last: Days) -> Records:
    """Inpatient visits last 1-6 days (never past the person's last day); others one day."""
    stay = np.where(visits.value == omop.VISIT_INPATIENT, rng.integers(1, 7, len(visits.day)), 0)
    end_day = np.minimum(visits.day + stay, np.maximum(last[visits.person], visits.day))
    return Records(visits.person, visits.day, end_day, visits.value, visits.link)


def _spread(rng: np.random.Generator, counts: Ints, first: Days, last: Days) -> tuple[Ints, Days]:
    """``counts[i]`` uniform days in ``[first[i], last[i]]`` for each person ``i``."""
    person = np.repeat(np.arange(len(counts)), counts)
    return person, uniform_day(rng, first[person], last[person])


def _outside_window(
    rng: np.random.Generator, person: Ints, start: Days, index: Days, last: Days
) -> Days:
    """Uniform days in ``[start, index - 366] U [index, last]`` (never in the window)."""
    before = np.maximum(0, index[person] - 366 - start[person] + 1)
    after = last[person] - index[person] + 1
    u = np.floor(rng.random(len(person)) * (before + after)).astype(np.int64)
    day: Days = np.where(u < before, start[person] + u, index[person] + (u - before))
    return day


def _weighted(rng: np.random.Generator, codes: Ints, weights: tuple[float, ...], n: int) -> Ints:
    return codes[rng.choice(len(codes), size=n, p=np.asarray(weights) / sum(weights))]


def _covariate_code(rng: np.random.Generator, covariate: Ints) -> Ints:
    pick = np.floor(rng.random(len(covariate)) * _COVARIATE_COUNT[covariate]).astype(np.int64)
    code: Ints = _COVARIATE_FIRST[covariate] + pick
    return code


def _remission_code(rng: np.random.Generator, day: Days) -> Ints:
    """F14.11 or F14.21; F14.91 too from 2020-10-01 on."""
    u = rng.random(len(day))
    pick = np.where(u < 0.5, 0, 1)
    pick = np.where((day >= F14_91_FIRST_DAY) & (u >= 0.8), 2, pick)
    return REMISSION[pick]


def _comparator(rng: np.random.Generator, n: int) -> Ints:
    return _weighted(rng, COMPARATORS, COMPARATOR_WEIGHTS, n)


def _episodes(
    rng: np.random.Generator,
    visits: _Collector,
    drugs: _Collector,
    person: Ints,
    day: Days,
    drug: Ints,
    visit_concept: Ints | int,
) -> None:
    """Anaesthesia episodes: a visit, its main drug, sometimes a 2nd anaesthetic and fentanyl.

    The second anaesthetic is a comparator (propofol, or midazolam after propofol);
    it never adds ketamine.
    """
    position = visits.add(person, day, visit_concept)
    drugs.add(person, day, drug, position)
    second = rng.random(len(person)) < 0.35
    co_drug = np.where(drug[second] == PROPOFOL_CODE, MIDAZOLAM_CODE, PROPOFOL_CODE)
    drugs.add(person[second], day[second], co_drug, position[second])
    opioid = rng.random(len(person)) < 0.5
    drugs.add(person[opioid], day[opioid], FENTANYL_CODE, position[opioid])


def _routine(
    rng: np.random.Generator,
    conditions: _Collector,
    visits: _Collector,
    drugs: _Collector,
    start: Days,
    last: Days,
    emergency_rate: npt.NDArray[np.float64],
) -> None:
    """Outpatient/inpatient visits, ER visits at ``emergency_rate``, other codes and drugs."""
    n = len(start)
    person, day = _spread(rng, rng.poisson(3.0, n), start, last)
    inpatient = rng.random(len(person)) < 0.15
    visits.add(person, day, np.where(inpatient, omop.VISIT_INPATIENT, omop.VISIT_OUTPATIENT))
    person, day = _spread(rng, rng.poisson(emergency_rate), start, last)
    visits.add(person, day, omop.VISIT_EMERGENCY)
    person, day = _spread(rng, rng.poisson(1.5, n), start, last)
    conditions.add(
        person, day, OTHER_CONDITIONS[rng.integers(0, len(OTHER_CONDITIONS), len(person))]
    )
    person, day = _spread(rng, rng.poisson(1.5, n), start, last)
    drugs.add(person, day, OTHER_MEDICATIONS[rng.integers(0, len(OTHER_MEDICATIONS), len(person))])


class _Diagnosed(Protocol):
    """A block of CUD patients: their entry date and code, and their last day."""

    @property
    def entry(self) -> Days: ...
    @property
    def entry_code(self) -> Ints: ...
    @property
    def last_day(self) -> Days: ...
    @property
    def size(self) -> int: ...


def cud_diagnoses(rng: np.random.Generator, p: _Diagnosed, conditions: _Collector) -> None:
    """The entry code on the entry date, then repeated CUD codes after it."""
    entry, last = p.entry, p.last_day
    conditions.add(np.arange(p.size), entry, ENTRY[p.entry_code])
    repeats = rng.poisson(1.5, p.size) * (entry < last)
    person, day = _spread(rng, repeats, entry + 1, np.maximum(last, entry + 1))
    conditions.add(person, day, _weighted(rng, ENTRY, ENTRY_CODE_WEIGHTS, len(person)))


def _cud_covariates(
    rng: np.random.Generator, p: CudPersons, conditions: _Collector, visits: _Collector
) -> None:
    """Covariate codes and ER visits, in and around the covariate window of index."""
    start, last, index = p.observation_start, p.last_day, p.index
    anaesthesia = np.flatnonzero(p.anaesthesia)
    window_first = np.maximum(start, index - 365)
    # True covariates of anaesthesia patients: 1+ records inside [index-365, index-1].
    person, covariate = np.nonzero(p.conditions & p.anaesthesia[:, None])
    repeats = 1 + rng.poisson(0.4, len(person))
    person, covariate = np.repeat(person, repeats), np.repeat(covariate, repeats)
    day = uniform_day(rng, window_first[person], index[person] - 1)
    conditions.add(person, day, _covariate_code(rng, covariate))
    # Any covariate outside the window (noise the rules must ignore), also on its edges.
    noise = (rng.random(p.conditions.shape) < NOISE_PROBABILITY) & p.anaesthesia[:, None]
    person, covariate = np.nonzero(noise)
    day = _outside_window(rng, person, start, index, last)
    conditions.add(person, day, _covariate_code(rng, covariate))
    for edge_day in (index - 366, index):
        person = anaesthesia[rng.random(len(anaesthesia)) < EDGE_RECORD_PROBABILITY]
        day = np.where(edge_day[person] >= start[person], edge_day[person], index[person])
        covariate = rng.integers(0, len(_COVARIATE_FIRST), len(person))
        conditions.add(person, day, _covariate_code(rng, covariate))
    # Patients without anaesthesia: their conditions anywhere in observation.
    person, covariate = np.nonzero(p.conditions & ~p.anaesthesia[:, None])
    day = uniform_day(rng, start[person], last[person])
    conditions.add(person, day, _covariate_code(rng, covariate))

    # ER visits: exactly emergency_visits in the window, more outside it.
    person = np.repeat(anaesthesia, p.emergency_visits[anaesthesia])
    day = uniform_day(rng, window_first[person], index[person] - 1)
    visits.add(person, day, omop.VISIT_EMERGENCY)
    person = np.repeat(anaesthesia, rng.poisson(0.7, len(anaesthesia)))
    visits.add(person, _outside_window(rng, person, start, index, last), omop.VISIT_EMERGENCY)


def _cud_remissions(rng: np.random.Generator, p: CudPersons, conditions: _Collector) -> None:
    """Remission codes: the outcome after index (if observed), sometimes repeated; the
    planted prior remissions; and the natural history of patients without anaesthesia."""
    last, index = p.last_day, p.index
    anaesthesia = np.flatnonzero(p.anaesthesia)
    day = index[anaesthesia] + p.remission_observed[anaesthesia]
    recorded = day <= last[anaesthesia]
    person, day = anaesthesia[recorded], day[recorded]
    conditions.add(person, day, _remission_code(rng, day))
    again = rng.random(len(person)) < 0.3
    person, day = person[again], day[again] + rng.integers(1, 181, int(again.sum()))
    keep = day <= last[person]
    conditions.add(person[keep], day[keep], _remission_code(rng, day[keep]))

    person = np.flatnonzero(p.prior_remission < index)
    day = p.prior_remission[person]
    conditions.add(person, day, _remission_code(rng, day))

    others = np.flatnonzero(~p.anaesthesia)
    person = others[rng.random(len(others)) < 0.25]
    day = p.entry[person] + rng.integers(30, 2001, len(person))
    keep = day <= last[person]
    conditions.add(person[keep], day[keep], _remission_code(rng, day[keep]))


def cud_records(rng: np.random.Generator, p: CudPersons) -> BlockRecords:
    """All condition, visit and drug records of a block of CUD patients."""
    conditions, visits, drugs = _Collector(), _Collector(), _Collector()
    cud_diagnoses(rng, p, conditions)
    _cud_covariates(rng, p, conditions, visits)
    emergency_rate = np.where(p.anaesthesia, 0.0, 1.2)  # anaesthesia patients: see above
    _routine(rng, conditions, visits, drugs, p.observation_start, p.last_day, emergency_rate)
    _cud_remissions(rng, p, conditions)
    _cud_anaesthesia(rng, p, visits, drugs)
    visit_records = _with_stays(rng, visits.collect(), p.last_day)
    return BlockRecords(conditions.collect(), visit_records, drugs.collect())


def _procedure_visit(rng: np.random.Generator, n: int, emergency: float = 0.0) -> Ints:
    """Visit concepts of anaesthesia episodes: inpatient, outpatient or (at index) ER."""
    concepts = np.array([omop.VISIT_INPATIENT, omop.VISIT_OUTPATIENT, omop.VISIT_EMERGENCY])
    weights = np.array([0.65, 0.35 - emergency, emergency])
    return concepts[rng.choice(3, size=n, p=weights)]


def _cud_anaesthesia(
    rng: np.random.Generator, p: CudPersons, visits: _Collector, drugs: _Collector
) -> None:
    """Anaesthesia episodes of CUD patients: at index, after index, and before entry."""
    n, start, last, entry, index = p.size, p.observation_start, p.last_day, p.entry, p.index
    anaesthesia = np.flatnonzero(p.anaesthesia)
    size = len(anaesthesia)
    drug = np.where(p.ketamine_at_index[anaesthesia], KETAMINE_CODE, _comparator(rng, size))
    # An ER visit on the index day is day 0: outside the covariate window.
    concept = _procedure_visit(rng, size, emergency=0.1)
    _episodes(rng, visits, drugs, anaesthesia, index[anaesthesia], drug, concept)

    # A later anaesthesia: a comparator, or ketamine again for the exposed.
    later = anaesthesia[(rng.random(size) < 0.15) & (index[anaesthesia] < last[anaesthesia])]
    day = uniform_day(rng, index[later] + 1, last[later])
    again = p.ketamine_at_index[later] & (rng.random(len(later)) < 0.3)
    drug = np.where(again, KETAMINE_CODE, _comparator(rng, len(later)))
    _episodes(rng, visits, drugs, later, day, drug, _procedure_visit(rng, len(later)))

    # Before entry: the planted ketamine_before_entry patients, a few exposed patients and
    # patients without anaesthesia (ketamine), and comparators for anyone but the former.
    room = start < entry
    ketamine_first = p.anaesthesia & (p.edge_case == EDGE["ketamine_before_entry"])
    ketamine = room & (
        ketamine_first
        | (p.ketamine_at_index & (rng.random(n) < 0.03))
        | (~p.anaesthesia & (rng.random(n) < 0.01))
    )
    comparator = room & ~ketamine_first & (rng.random(n) < 0.04)
    for chosen, is_ketamine in (
        (np.flatnonzero(ketamine), True),
        (np.flatnonzero(comparator), False),
    ):
        day = uniform_day(rng, start[chosen], entry[chosen] - 1)
        drug = np.full(len(chosen), KETAMINE_CODE) if is_ketamine else _comparator(rng, len(chosen))
        _episodes(rng, visits, drugs, chosen, day, drug, _procedure_visit(rng, len(chosen)))


def background_records(rng: np.random.Generator, p: BackgroundPersons) -> BlockRecords:
    """Records of persons without CUD: conditions, visits, some anaesthetics, never F14."""
    conditions, visits, drugs = _Collector(), _Collector(), _Collector()
    n, start, last = p.size, p.observation_start, p.last_day
    person, covariate = np.nonzero(p.conditions)
    repeats = 1 + rng.poisson(0.3, len(person))
    person, covariate = np.repeat(person, repeats), np.repeat(covariate, repeats)
    conditions.add(
        person, uniform_day(rng, start[person], last[person]), _covariate_code(rng, covariate)
    )
    _routine(rng, conditions, visits, drugs, start, last, np.full(n, 0.6))
    episodes = (rng.random(n) < 0.25) * (1 + (rng.random(n) < 0.3))
    person, day = _spread(rng, episodes.astype(np.int64), start, last)
    drug = np.where(rng.random(len(person)) < 0.2, KETAMINE_CODE, _comparator(rng, len(person)))
    concept = _procedure_visit(rng, len(person), emergency=0.1)
    _episodes(rng, visits, drugs, person, day, drug, concept)
    return BlockRecords(
        conditions.collect(), _with_stays(rng, visits.collect(), last), drugs.collect()
    )
