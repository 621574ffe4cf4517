"""The planted data-generating model: covariates, propensity, remission hazard, sites.

Linear predictors use the protocol's covariates exactly as the cohort rules measure them
(docs/cohort_rules.md, rule 8), with age entering as ``age - AGE_REFERENCE``:

    logit P(ketamine | anaesthesia) = alpha_site + gamma' x
    remission hazard per day        = lambda_site * exp(beta * ketamine + delta' x)

The same covariates (depression, chronic pain, PTSD, anxiety, younger age, emergency
visits) raise both, so the crude hazard ratio overstates ``exp(beta)``. Sites differ in
size, case mix, ``alpha_site`` and ``lambda_site``; site itself is therefore a
confounder too (fit stratified by site, or adjust for it).

Comparison B1 of the reference protocol (ketamine vs antidepressants in CUD patients
with depression) uses the same hazard: the antidepressant starters (``antidepressants.py``)
have ``lambda_site * exp(delta' x)`` from their first antidepressant, ``x`` measured the
same way at that index.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import numpy as np

from shared.synthetic.days import day_number
from shared.synthetic.vocabulary import COVARIATE_CODES

CONDITION_COVARIATES: tuple[str, ...] = tuple(COVARIATE_CODES)
COVARIATES: tuple[str, ...] = (
    "age",
    "sex_female",
    "race_black",
    "race_asian",
    "race_other",
    *CONDITION_COVARIATES,
    "prior_emergency_visits",
)
AGE_REFERENCE = 40  # years; the baseline hazard and intercepts refer to this age

FIRST_ENTRY = day_number(dt.date(2008, 1, 1))  # earliest first CUD diagnosis
LAST_ENTRY = day_number(dt.date(2021, 6, 30))  # latest first CUD diagnosis
DATA_END = day_number(dt.date(2022, 6, 30))  # extraction date: no record after it
F14_91_FIRST_DAY = day_number(dt.date(2020, 10, 1))

# Edge cases planted among anaesthesia patients (each fails one cohort rule on purpose).
EDGE_CASES: tuple[str, ...] = (
    "none",
    "short_washout",  # observation starts < 365 days before index
    "prior_remission",  # a remission code between entry and index
    "minor",  # year(index) - year_of_birth < 18
    "ketamine_before_entry",  # ketamine before the CUD diagnosis, comparator at index
    "no_time_at_risk",  # observation ends, or death, on the index day
)


@dataclass(frozen=True)
class PlantedModel:
    """Population-level parameters shared by every site."""

    hr_conditional: float = 1.98
    outcome_coefficients: dict[str, float] = field(
        default_factory=lambda: {
            "age": -0.035,
            "sex_female": 0.10,
            "race_black": -0.10,
            "race_asian": 0.0,
            "race_other": 0.05,
            "depression": 0.75,
            "anxiety": 0.30,
            "ptsd": 0.45,
            "bipolar": -0.10,
            "alcohol_use_disorder": -0.20,
            "opioid_use_disorder": -0.30,
            "cannabis_use_disorder": -0.05,
            "tobacco_use_disorder": -0.10,
            "chronic_pain": 0.70,
            "hiv": -0.20,
            "hepatitis_c": -0.15,
            "prior_emergency_visits": 0.08,
        }
    )
    propensity_coefficients: dict[str, float] = field(
        default_factory=lambda: {
            "age": -0.035,
            "sex_female": 0.10,
            "race_black": -0.35,
            "race_asian": 0.0,
            "race_other": 0.10,
            "depression": 1.20,
            "anxiety": 0.35,
            "ptsd": 0.65,
            "bipolar": 0.20,
            "alcohol_use_disorder": 0.0,
            "opioid_use_disorder": 0.25,
            "cannabis_use_disorder": 0.0,
            "tobacco_use_disorder": 0.0,
            "chronic_pain": 1.10,
            "hiv": 0.0,
            "hepatitis_c": 0.0,
            "prior_emergency_visits": 0.15,
        }
    )
    propensity_intercept: float = -2.5
    daily_hazard: float = 1.7e-4  # baseline remission hazard at reference covariates
    site_propensity_spread: float = 0.45  # alpha_site = intercept + spread * z_site
    site_hazard_spread: float = 0.30  # log lambda_site = log hazard - spread * z_site
    site_case_mix_sd: float = 0.30  # site shifts of covariate prevalence logits
    condition_prevalence: dict[str, float] = field(
        default_factory=lambda: {
            "depression": 0.28,
            "anxiety": 0.24,
            "ptsd": 0.10,
            "bipolar": 0.10,
            "alcohol_use_disorder": 0.35,
            "opioid_use_disorder": 0.20,
            "cannabis_use_disorder": 0.25,
            "tobacco_use_disorder": 0.55,
            "chronic_pain": 0.18,
            "hiv": 0.04,
            "hepatitis_c": 0.10,
        }
    )
    severity_loading: float = 0.6  # shared latent severity correlates the conditions
    emergency_visit_rate: float = 0.9  # mean ER visits in the year before index
    female_prevalence: float = 0.36
    race_probabilities: tuple[float, float, float, float] = (0.55, 0.33, 0.02, 0.10)
    hispanic_prevalence: float = 0.12
    mean_age: float = 39.0
    sd_age: float = 11.0
    minor_at_entry: float = 0.03
    anaesthesia_probability: float = 0.28
    edge_case_probabilities: dict[str, float] = field(
        default_factory=lambda: {
            "none": 0.86,
            "short_washout": 0.04,
            "prior_remission": 0.03,
            "minor": 0.025,
            "ketamine_before_entry": 0.025,
            "no_time_at_risk": 0.02,
        }
    )
    early_end_probability: float = 0.12  # observation ends within a year of index
    death_risk_one_year: float = 0.03

    @property
    def beta_treatment(self) -> float:
        """The planted conditional log hazard ratio of ketamine."""
        return math.log(self.hr_conditional)


@dataclass(frozen=True)
class SiteParameters:
    """One site: its size and the site-specific parts of the model."""

    site_id: str
    number: int
    share: float
    n_cud: int
    n_background: int
    n_antidepressant: int
    propensity_intercept: float
    daily_hazard: float
    condition_prevalence: dict[str, float]
    female_prevalence: float
    race_probabilities: tuple[float, float, float, float]
    emergency_visit_rate: float
    mean_age: float


def site_shares(n_sites: int) -> list[float]:
    """The fixed decreasing size pattern: 0.5/0.3/0.2 for three sites.

    Weights are 5, 3, 2, then 2 * 0.8**(k - 3) for the k-th further site, normalised.
    """
    weights = [5.0, 3.0, 2.0][:n_sites]
    weights += [2.0 * 0.8 ** (k + 1) for k in range(max(0, n_sites - 3))]
    total = sum(weights)
    return [w / total for w in weights]


def allocate(total: int, shares: list[float]) -> list[int]:
    """Split ``total`` by ``shares`` into integers that sum to it (largest remainder)."""
    raw = [total * s for s in shares]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def site_parameters(
    model: PlantedModel,
    n_sites: int,
    n_patients: int,
    n_background: int,
    rng: np.random.Generator,
    n_antidepressant: int = 0,
) -> list[SiteParameters]:
    """Draw each site's case mix with ``rng``; spread intercepts and hazards evenly.

    Site k of K sits at ``z = -1 + 2k/(K-1)`` (0 for a single site): later (smaller)
    sites treat more often with ketamine and have lower baseline remission. The
    ``n_antidepressant`` starters split by the same shares (no draw).
    """
    shares = site_shares(n_sites)
    n_cud = allocate(n_patients, shares)
    n_bg = allocate(n_background, shares)
    n_ad = allocate(n_antidepressant, shares)
    sites = []
    for k in range(n_sites):
        z = 0.0 if n_sites == 1 else -1.0 + 2.0 * k / (n_sites - 1)
        shift = rng.normal(0.0, model.site_case_mix_sd, size=len(CONDITION_COVARIATES) + 2)
        prevalence = {
            name: round(_expit(_logit(model.condition_prevalence[name]) + shift[j]), 4)
            for j, name in enumerate(CONDITION_COVARIATES)
        }
        white, black, asian, other = model.race_probabilities
        black_k = _expit(_logit(black) + shift[-1])
        race = (
            white * (1 - black_k) / (1 - black),
            black_k,
            asian * (1 - black_k) / (1 - black),
            other * (1 - black_k) / (1 - black),
        )
        sites.append(
            SiteParameters(
                site_id=f"site_{k + 1:02d}",
                number=k + 1,
                share=round(shares[k], 6),
                n_cud=n_cud[k],
                n_background=n_bg[k],
                n_antidepressant=n_ad[k],
                propensity_intercept=round(
                    model.propensity_intercept + model.site_propensity_spread * z, 6
                ),
                daily_hazard=float(
                    f"{model.daily_hazard * math.exp(-model.site_hazard_spread * z):.6g}"
                ),
                condition_prevalence=prevalence,
                female_prevalence=round(_expit(_logit(model.female_prevalence) + shift[-2]), 4),
                race_probabilities=tuple(round(p, 6) for p in race),  # type: ignore[arg-type]
                emergency_visit_rate=round(
                    model.emergency_visit_rate * math.exp(0.5 * shift[0]), 4
                ),
                mean_age=round(model.mean_age + 2.0 * shift[1] / model.site_case_mix_sd, 2),
            )
        )
    return sites
