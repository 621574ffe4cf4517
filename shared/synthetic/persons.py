"""Person-level simulation of one block of CUD patients or background persons.

Everything the cohort rules look at is decided here, per person, as numpy arrays: the
entry date, the anaesthesia (index) date and drug, the observation period, death, the
covariates in the year before index and the potential remission times. ``events.py``
then writes records that make exactly these facts true.
"""

from __future__ import annotations

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
    severity: Floats  # latent, drives case mix only (never enters a model directly)
    conditions: Bools  # (n, len(CONDITION_COVARIATES)); for anaesthesia: in the index window
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
        return int(self.entry.shape[0])

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
    severity: Floats

    @property
    def size(self) -> int:
        """Number of persons in the block."""
        return int(self.observation_start.shape[0])

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
    n = reference_day.shape[0]
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
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, severity: Floats, scale: float
) -> Bools:
    prevalence = np.array([site.condition_prevalence[c] for c in CONDITION_COVARIATES]) * scale
    logit = np.log(prevalence / (1 - prevalence))
    p = 1.0 / (1.0 + np.exp(-(logit[None, :] + model.severity_loading * severity[:, None])))
    return rng.random(p.shape) < p


def simulate_cud_persons(
    rng: np.random.Generator, site: SiteParameters, model: PlantedModel, n: int
) -> CudPersons:
    """Simulate ``n`` CUD patients of ``site`` (see the module docstring of ``model``)."""
    entry = rng.integers(FIRST_ENTRY, LAST_ENTRY + 1, n)
    entry_code = rng.choice(len(ENTRY_CODE_WEIGHTS), size=n, p=ENTRY_CODE_WEIGHTS).astype(np.int64)
    demo = _demographics(rng, site, model, entry)
    severity = rng.normal(0.0, 1.0, n)
    conditions = _conditions(rng, site, model, severity, 1.0)
    er_mean = site.emergency_visit_rate * np.exp(0.4 * severity - 0.08)
    emergency_visits = rng.poisson(er_mean).astype(np.int64)

    anaesthesia = rng.random(n) < model.anaesthesia_probability
    edge_p = np.array([model.edge_case_probabilities[e] for e in EDGE_CASES])
    edge = np.where(
        anaesthesia, rng.choice(len(EDGE_CASES), size=n, p=edge_p / edge_p.sum()), EDGE["none"]
    ).astype(np.int64)
    short_washout = anaesthesia & (edge == EDGE["short_washout"])
    prior = anaesthesia & (edge == EDGE["prior_remission"])
    minor = anaesthesia & (edge == EDGE["minor"])
    ketamine_first = anaesthesia & (edge == EDGE["ketamine_before_entry"])
    no_time = anaesthesia & (edge == EDGE["no_time_at_risk"])

    # Index: the anaesthesia, on or after entry and at least a day before DATA_END.
    latest = np.minimum(1500, DATA_END - 1 - entry)
    offset = uniform_day(rng, np.where(prior, 30, 0), np.where(short_washout, np.minimum(latest, 300), latest))
    index = np.where(anaesthesia, entry + offset, entry)
    index_year = calendar_year(index)
    minor_age = rng.integers(14, 18, n)
    year_of_birth = np.where(minor, index_year - minor_age, demo.year_of_birth)
    demo = Demographics(
        demo.female, demo.race, demo.hispanic, year_of_birth, demo.month_of_birth, demo.day_of_birth
    )

    x = design_matrix(demo, index_year, conditions, emergency_visits)
    propensity = 1.0 / (
        1.0 + np.exp(-(site.propensity_intercept + x @ _coefficients(model.propensity_coefficients)))
    )
    treated = rng.random(n) < propensity
    ketamine_at_index = anaesthesia & treated & ~ketamine_first

    # Potential remission days with common random numbers.
    unit = rng.exponential(1.0, n)
    rate = site.daily_hazard * np.exp(x @ _coefficients(model.outcome_coefficients))
    remission_untreated = np.minimum(np.ceil(unit / rate), MAX_REMISSION_DAY).astype(np.int64)
    remission_treated = np.minimum(
        np.ceil(unit / (rate * model.hr_conditional)), MAX_REMISSION_DAY
    ).astype(np.int64)

    # Observation period.
    lookback = rng.integers(0, 1501, n)
    start = np.where(anaesthesia, np.minimum(entry, index - 365), entry) - lookback
    start = np.where(ketamine_first, np.minimum(entry - 30, index - 365) - lookback, start)
    exact_washout = anaesthesia & (edge == EDGE["none"]) & (offset <= 365) & (rng.random(n) < 0.03)
    start = np.where(exact_washout, index - 365, start)
    short = uniform_day(rng, np.where(short_washout, np.maximum(offset, 30), 30), 364)
    start = np.where(short_washout, index - short, start)

    follow = np.where(
        rng.random(n) < model.early_end_probability, rng.integers(1, 366, n), rng.integers(366, 3001, n)
    )
    end = np.where(anaesthesia, np.minimum(DATA_END, index + follow), np.minimum(DATA_END, entry + rng.integers(30, 4001, n)))

    # Death: exponential after index for anaesthesia patients, uniform otherwise.
    daily_death = -np.log1p(-model.death_risk_one_year) / 365.0
    death_after = np.ceil(rng.exponential(1.0 / daily_death, n)).astype(np.int64)
    death = np.where(anaesthesia, index + death_after, NO_DAY)
    other_death = ~anaesthesia & (rng.random(n) < model.death_risk_one_year)
    death = np.where(other_death, uniform_day(rng, entry, end), death)
    death = np.where(death <= end, death, NO_DAY)
    end_at_death = (death != NO_DAY) & (rng.random(n) < 0.5)
    end = np.where(end_at_death, death, end)

    # No time at risk: observation ends on the index day, or death on the index day.
    dies_at_index = rng.random(n) < 0.5
    end = np.where(no_time & ~dies_at_index, index, end)
    death = np.where(no_time & ~dies_at_index, NO_DAY, death)
    death = np.where(no_time & dies_at_index, index, death)

    prior_remission = np.where(
        prior, uniform_day(rng, np.maximum(start, entry + 1), np.maximum(index - 1, entry + 1)), NO_DAY
    )

    return CudPersons(
        demographics=demo,
        entry=entry,
        entry_code=entry_code,
        severity=severity,
        conditions=conditions,
        emergency_visits=emergency_visits,
        anaesthesia=anaesthesia,
        edge_case=edge,
        index=index,
        ketamine_at_index=ketamine_at_index,
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
        severity=severity,
    )
