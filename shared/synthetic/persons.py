"""Person-level simulation of one block of CUD patients or background persons.

Everything the cohort rules look at is decided here, per person, as numpy arrays: the
entry date, the anaesthesia (index) date and drug, the observation period, death, the
covariates in the year before index and the potential remission times. ``events.py``
then writes records that make exactly these facts true.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.synthetic.days import Days, calendar_year, uniform_day
from shared.synthetic.model import (
    AGE_REFERENCE,
    CONDITION_COVARIATES,
    COVARIATES,
    DATA_END,
    EDGE_CASES,
    FIRST_ENTRY,
    LAST_ENTRY,
    PlantedModel,
    SiteParameters,
)
from shared.synthetic.vocabulary import ENTRY_CODE_WEIGHTS

NO_DAY = np.iinfo(np.int64).max // 4  # "never" for optional dates (death, prior remission)
MAX_REMISSION_DAY = 100_000  # potential remission times are capped here (far past follow-up)

Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

EDGE = {name: code for code, name in enumerate(EDGE_CASES)}


@dataclass(frozen=True)
class Demographics:
    """Sex, race (0 white, 1 black, 2 asian, 3 other), ethnicity and birth date."""

    female: Bools
    race: Ints
    hispanic: Bools
    year_of_birth: Ints
    month_of_birth: Ints
    day_of_birth: Ints


@dataclass(frozen=True)
class CudPersons:
    """A block of CUD patients. Per-person arrays; index-related ones matter only where
    ``anaesthesia`` is true."""

    demographics: Demographics
    entry: Days  # first CUD diagnosis
    entry_code: Ints  # which of ENTRY_CODES
    conditions: Bools  # (n, len(CONDITION_COVARIATES)); for anaesthesia: in the index window
    # (a latent severity, drawn per person, correlates the conditions and ER visits only)
    emergency_visits: Ints  # ER visits in the covariate window (anaesthesia patients)
    anaesthesia: Bools
    edge_case: Ints  # EDGE_CASES code
    index: Days  # anaesthesia date (== entry where no anaesthesia)
    ketamine_at_index: Bools
    propensity: Floats
    observation_start: Days
    observation_end: Days
    death: Days  # NO_DAY when alive
    prior_remission: Days  # NO_DAY unless edge case prior_remission
    remission_treated: Ints  # potential remission day after index under ketamine
    remission_untreated: Ints  # ... under a comparator (same random number)

    @property
    def size(self) -> int:
        """Number of persons in the block."""
        return len(self.entry)

    @property
    def remission_observed(self) -> Ints:
        """Remission day after index under the drug actually given."""
        return np.where(self.ketamine_at_index, self.remission_treated, self.remission_untreated)

    @property
    def last_day(self) -> Days:
        """Last day a record can carry: end of observation or death, whichever is first."""
        return np.minimum(self.observation_end, self.death)

    def design_matrix(self) -> Floats:
        """Covariates in ``COVARIATES`` order as rule 8 measures them at the index date."""
        return design_matrix(
            self.demographics, calendar_year(self.index), self.conditions, self.emergency_visits
        )


@dataclass(frozen=True)
class BackgroundPersons:
    """A block of persons without CUD."""

    demographics: Demographics
    observation_start: Days
    observation_end: Days
    death: Days
    conditions: Bools  # ever recorded, anywhere in observation

    @property
    def size(self) -> int:
        """Number of persons in the block."""
        return len(self.observation_start)

    @property
    def last_day(self) -> Days:
        """Last day a record can carry."""
        return np.minimum(self.observation_end, self.death)


def design_matrix(
    demographics: Demographics, index_year: Ints, conditions: Bools, emergency_visits: Ints
) -> Floats:
    """Covariate matrix in ``COVARIATES`` order, age centred at ``AGE_REFERENCE``."""
    age = index_year - demographics.year_of_birth
    columns = [
        age - AGE_REFERENCE,
        demographics.female,
        demographics.race == 1,
        demographics.race == 2,
        demographics.race == 3,
        *(conditions[:, j] for j in range(conditions.shape[1])),
        emergency_visits,
    ]
    return np.column_stack(columns).astype(np.float64)


def _coefficients(values: dict[str, float]) -> Floats:
    return np.array([values[name] for name in COVARIATES], dtype=np.float64)


def _demographics(
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, reference_day: Days
) -> Demographics:
    n = len(reference_day)
    race_p = np.asarray(site.race_probabilities, dtype=np.float64)
    age = np.clip(np.rint(rng.normal(site.mean_age, model.sd_age, n)), 18, 85).astype(np.int64)
    minor = rng.random(n) < model.minor_at_entry
    age[minor] = rng.integers(14, 18, int(minor.sum()))
    return Demographics(
        female=rng.random(n) < site.female_prevalence,
        race=rng.choice(4, size=n, p=race_p / race_p.sum()).astype(np.int64),
        hispanic=rng.random(n) < model.hispanic_prevalence,
        year_of_birth=calendar_year(reference_day) - age,
        month_of_birth=rng.integers(1, 13, n),
        day_of_birth=rng.integers(1, 29, n),
    )


def _conditions(
    rng: np.random.Generator,
    site: SiteParameters,
    model: PlantedModel,
    severity: Floats,
    scale: float,
) -> Bools:
    prevalence = np.array([site.condition_prevalence[c] for c in CONDITION_COVARIATES]) * scale
    logit = np.log(prevalence / (1 - prevalence))
    p = 1.0 / (1.0 + np.exp(-(logit[None, :] + model.severity_loading * severity[:, None])))
    return rng.random(p.shape) < p


def _edge_cases(rng: np.random.Generator, model: PlantedModel, anaesthesia: Bools) -> Ints:
    """An ``EDGE_CASES`` code per person ("none" for everyone without anaesthesia)."""
    weights = np.array([model.edge_case_probabilities[e] for e in EDGE_CASES])
    drawn = rng.choice(len(EDGE_CASES), size=len(anaesthesia), p=weights / weights.sum())
    edge: Ints = np.where(anaesthesia, drawn, EDGE["none"]).astype(np.int64)
    return edge


def _index_offset(rng: np.random.Generator, entry: Days, edge: Ints) -> Ints:
    """Days from entry to the anaesthesia: 0-1500, ending at least a day before DATA_END.

    A prior remission needs room before index (>= 30 days); a short washout a short
    history (<= 300 days, so that observation can start after entry-less-than-a-year).
    """
    latest = np.minimum(1500, DATA_END - 1 - entry)
    first = np.where(edge == EDGE["prior_remission"], 30, 0)
    last = np.where(edge == EDGE["short_washout"], np.minimum(latest, 300), latest)
    return uniform_day(rng, first, last)


def _potential_remission(
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, x: Floats
) -> tuple[Ints, Ints]:
    """Remission days under ketamine and under a comparator, from one shared exponential."""
    unit = rng.exponential(1.0, len(x))
    rate = site.daily_hazard * np.exp(x @ _coefficients(model.outcome_coefficients))
    treated = np.minimum(np.ceil(unit / (rate * model.hr_conditional)), MAX_REMISSION_DAY)
    untreated = np.minimum(np.ceil(unit / rate), MAX_REMISSION_DAY)
    return treated.astype(np.int64), untreated.astype(np.int64)


def _observation_start(
    rng: np.random.Generator, entry: Days, index: Days, anaesthesia: Bools, edge: Ints
) -> Days:
    """Start of observation: before entry, and >= 365 days before index unless the edge
    case ``short_washout`` (30-364 days, still on or before entry)."""
    n = len(entry)
    lookback = rng.integers(0, 1501, n)
    start = np.where(anaesthesia, np.minimum(entry, index - 365), entry) - lookback
    ketamine_first = edge == EDGE["ketamine_before_entry"]  # needs room for that ketamine
    start = np.where(ketamine_first, np.minimum(entry - 30, index - 365) - lookback, start)
    exactly_a_year = (edge == EDGE["none"]) & anaesthesia & (index - entry <= 365)
    start = np.where(exactly_a_year & (rng.random(n) < 0.03), index - 365, start)
    short_washout = edge == EDGE["short_washout"]
    short = uniform_day(rng, np.where(short_washout, np.maximum(index - entry, 30), 30), 364)
    result: Days = np.where(short_washout, index - short, start)
    return result


def _observation_end_and_death(
    rng: np.random.Generator,
    model: PlantedModel,
    entry: Days,
    index: Days,
    anaesthesia: Bools,
    edge: Ints,
) -> tuple[Days, Days]:
    """End of observation and death date (``NO_DAY`` if alive).

    After anaesthesia observation runs on for 1-365 days (``early_end_probability``) or
    366-3000 days, cut at DATA_END; death follows an exponential from index. Half of the
    deaths also end observation; the other half leave it running (registry deaths). The
    edge case ``no_time_at_risk`` ends observation, or dies, on the index day.
    """
    n = len(entry)
    early = rng.random(n) < model.early_end_probability
    follow = np.where(early, rng.integers(1, 366, n), rng.integers(366, 3001, n))
    end = np.where(
        anaesthesia,
        np.minimum(DATA_END, index + follow),
        np.minimum(DATA_END, entry + rng.integers(30, 4001, n)),
    )
    daily_death = -np.log1p(-model.death_risk_one_year) / 365.0
    death_after = np.ceil(rng.exponential(1.0 / daily_death, n)).astype(np.int64)
    death = np.where(anaesthesia, index + death_after, NO_DAY)
    other_death = ~anaesthesia & (rng.random(n) < model.death_risk_one_year)
    death = np.where(other_death, uniform_day(rng, entry, end), death)
    death = np.where(death <= end, death, NO_DAY)
    end = np.where((death != NO_DAY) & (rng.random(n) < 0.5), death, end)

    no_time = edge == EDGE["no_time_at_risk"]
    dies_at_index = rng.random(n) < 0.5
    end = np.where(no_time & ~dies_at_index, index, end)
    death = np.where(no_time & ~dies_at_index, NO_DAY, death)
    death = np.where(no_time & dies_at_index, index, death)
    return end, death


def simulate_cud_persons(
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, n: int
) -> CudPersons:
    """Simulate ``n`` CUD patients of ``site`` (see the module docstring of ``model``)."""
    entry = rng.integers(FIRST_ENTRY, LAST_ENTRY + 1, n)
    entry_code = rng.choice(len(ENTRY_CODE_WEIGHTS), size=n, p=ENTRY_CODE_WEIGHTS).astype(np.int64)
    demo = _demographics(rng, site, model, entry)
    severity = rng.normal(0.0, 1.0, n)
    conditions = _conditions(rng, site, model, severity, 1.0)
    emergency_visits = rng.poisson(site.emergency_visit_rate * np.exp(0.4 * severity - 0.08))

    anaesthesia = rng.random(n) < model.anaesthesia_probability
    edge = _edge_cases(rng, model, anaesthesia)
    index = np.where(anaesthesia, entry + _index_offset(rng, entry, edge), entry)
    minor = edge == EDGE["minor"]  # 14-17 in the index year
    year_of_birth = np.where(
        minor, calendar_year(index) - rng.integers(14, 18, n), demo.year_of_birth
    )
    demo = dataclasses.replace(demo, year_of_birth=year_of_birth)

    x = design_matrix(demo, calendar_year(index), conditions, emergency_visits)
    logit = site.propensity_intercept + x @ _coefficients(model.propensity_coefficients)
    propensity = 1.0 / (1.0 + np.exp(-logit))
    treated = rng.random(n) < propensity
    remission_treated, remission_untreated = _potential_remission(rng, site, model, x)

    start = _observation_start(rng, entry, index, anaesthesia, edge)
    end, death = _observation_end_and_death(rng, model, entry, index, anaesthesia, edge)
    prior = edge == EDGE["prior_remission"]  # between entry and index (index >= entry + 30)
    prior_remission = np.where(
        prior, uniform_day(rng, entry + 1, np.where(prior, index - 1, entry + 1)), NO_DAY
    )
    return CudPersons(
        demographics=demo,
        entry=entry,
        entry_code=entry_code,
        conditions=conditions,
        emergency_visits=emergency_visits,
        anaesthesia=anaesthesia,
        edge_case=edge,
        index=index,
        ketamine_at_index=anaesthesia & treated & (edge != EDGE["ketamine_before_entry"]),
        propensity=propensity,
        observation_start=start,
        observation_end=end,
        death=death,
        prior_remission=prior_remission,
        remission_treated=remission_treated,
        remission_untreated=remission_untreated,
    )


def simulate_background_persons(
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, n: int
) -> BackgroundPersons:
    """Simulate ``n`` persons without CUD (fewer comorbidities, no F14 code ever)."""
    start = rng.integers(FIRST_ENTRY - 3 * 365, LAST_ENTRY + 1, n)
    end = np.minimum(DATA_END, start + rng.integers(30, 5001, n))
    demo = _demographics(rng, site, model, start)
    severity = rng.normal(0.0, 1.0, n)
    conditions = _conditions(rng, site, model, severity, 0.4)
    death = np.where(rng.random(n) < 0.02, uniform_day(rng, start, end), NO_DAY)
    end = np.where((death != NO_DAY) & (rng.random(n) < 0.5), death, end)
    return BackgroundPersons(
        demographics=demo,
        observation_start=start,
        observation_end=end,
        death=death,
        conditions=conditions,
    )
