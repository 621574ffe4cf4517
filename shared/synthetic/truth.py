"""The answer key written next to the data: planted parameters, effects, expected cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import ConvergenceError
from shared.synthetic.answer_key import TIME_AT_RISK_END, CohortRows, SiteCohortTally
from shared.synthetic.breslow import CoxFit, fit_cox_breslow
from shared.synthetic.model import COVARIATES


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AttritionStep(_Frozen):
    """Persons left in each arm after one cohort rule (docs/cohort_rules.md order; the
    site agent's ``restriction`` step, where a comparison has one, follows ``arm``)."""

    rule: str
    n_exposed: int
    n_comparator: int


class ExpectedCohort(_Frozen):
    """What the cohort rules must give on a site's tables.

    ``person_days_*`` is the sum of rule 7's ``time`` (days 1..time are at risk);
    ``covariate_sums_*`` sums rule 8's covariates (age in years) over each arm.
    """

    n_cud: int = Field(
        description="persons with an entry code (rule 1): the CUD patients and the "
        "antidepressant starters"
    )
    attrition: list[AttritionStep]
    n_exposed: int
    n_comparator: int
    events_exposed: int
    events_comparator: int
    person_days_exposed: int
    person_days_comparator: int
    covariate_sums_exposed: dict[str, int]
    covariate_sums_comparator: dict[str, int]


class EffectInTreated(_Frozen):
    """The true effect in the eligible exposed, from their two potential remission times."""

    n_treated: int
    horizon_days: int
    risk_treated: float | None = Field(description="P(T(1) <= horizon)")
    risk_untreated: float | None = Field(description="P(T(0) <= horizon)")
    risk_ratio: float | None
    risk_difference: float | None
    hr_marginal: float | None = Field(
        description="Breslow Cox HR of stacked T(1), T(0), censored at horizon"
    )
    log_hr_marginal: float | None


class SiteTruth(_Frozen):
    """One site's planted parameters and where its tables are."""

    site_id: str
    lake: str = Field(description="folder of the site's Delta tables, relative to truth.json")
    share: float
    n_cud: int = Field(description="CUD patients of the main population (person ids first)")
    n_background: int
    n_antidepressant: int = Field(
        description="antidepressant starters, CUD patients too (person ids after the "
        "background persons)"
    )
    propensity_intercept: float
    daily_hazard: float = Field(description="baseline remission hazard per day (lambda_site)")
    condition_prevalence: dict[str, float]
    female_prevalence: float
    race_probabilities: dict[str, float]
    emergency_visit_rate: float
    mean_age: float


class CrudeHazardRatio(_Frozen):
    """Unadjusted Breslow Cox HR of the expected cohort (biased by planted confounding).

    ``None`` where the HR is not defined (an arm without events, in a tiny network).
    """

    pooled: float | None
    site_stratified: float | None


class ComparisonTruth(_Frozen):
    """A further planted comparison of the reference protocol
    (studies/ketamine_cud_reference.yaml), with what a correct analysis must find.

    B1 (``vs_antidepressants``): ketamine (comparison A's exposed with depression on or
    before index) vs the planted antidepressant starters. Both arms' remission hazards
    follow the planted model from their index, ``lambda_site * exp(beta * ketamine +
    delta'x)`` with ``x`` all of ``covariates`` as rule 8 measures them, so the conditional
    HR is ``hr_conditional``. The protocol leaves ``depression`` out (everyone has it on or
    before index); ``without_depression_in_window`` counts, per arm, the rows that have it
    only outside the covariate window (depression = 0 in ``x``): about the same share in
    both arms, so that leaving it out does not confound. The expected cohorts' attrition
    has the site agent's ``restriction`` step after ``arm``; their covariate sums cover
    every covariate, depression too.
    """

    comparison_id: str
    exposure: str
    comparator: str
    restriction: str
    beta_treatment: float = Field(description="planted conditional log HR of ketamine")
    hr_conditional: float
    without_depression_in_window: dict[str, int] = Field(description="rows, by arm")
    marginal_effect_in_treated: EffectInTreated
    marginal_effect_in_treated_by_site: dict[str, EffectInTreated]
    expected_cohort: dict[str, ExpectedCohort]
    expected_cohort_network: ExpectedCohort
    crude_hr: CrudeHazardRatio


class Truth(_Frozen):
    """Everything the generator planted and what a correct analysis must find."""

    generator_version: str
    seed: int
    n_sites: int
    n_patients: int
    n_background: int
    background_ratio: float
    n_antidepressant: int = Field(description="antidepressant starters (comparison B1)")
    antidepressant_ratio: float
    block_size: int
    beta_treatment: float = Field(description="planted conditional log HR of ketamine")
    hr_conditional: float
    covariates: list[str]
    age_reference: int = Field(description="age enters the linear predictors as age - this")
    delta: dict[str, float] = Field(description="remission log-hazard coefficients")
    propensity_coefficients: dict[str, float]
    anaesthesia_probability: float
    edge_case_probabilities: dict[str, float]
    sites: dict[str, SiteTruth]
    marginal_effect_in_treated: EffectInTreated
    marginal_effect_in_treated_by_site: dict[str, EffectInTreated]
    expected_cohort: dict[str, ExpectedCohort]
    expected_cohort_network: ExpectedCohort
    crude_hr: CrudeHazardRatio
    comparisons: dict[str, ComparisonTruth] = Field(
        description="further planted comparisons of the reference protocol, by comparison id"
    )

    def to_json(self) -> str:
        """Indented JSON, the content of truth.json."""
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, path: Path) -> Truth:
        """Read a truth.json."""
        return cls.model_validate_json(path.read_text())


def _hazard_ratio(
    time: npt.ArrayLike, event: npt.ArrayLike, x: npt.ArrayLike, strata: npt.ArrayLike | None = None
) -> CoxFit | None:
    try:
        return fit_cox_breslow(time, event, x, strata)
    except ConvergenceError:
        return None


def effect_in_treated(rows: CohortRows, horizon: int = TIME_AT_RISK_END) -> EffectInTreated:
    """Risks, risk ratio/difference and marginal HR of the exposed rows' potential outcomes.

    Quantities that are undefined (no treated rows, no events) are ``None``.
    """
    t1 = rows.remission_treated[rows.exposed]
    t0 = rows.remission_untreated[rows.exposed]
    n = len(t1)
    if n == 0:
        return EffectInTreated(
            n_treated=0,
            horizon_days=horizon,
            risk_treated=None,
            risk_untreated=None,
            risk_ratio=None,
            risk_difference=None,
            hr_marginal=None,
            log_hr_marginal=None,
        )
    risk1, risk0 = float(np.mean(t1 <= horizon)), float(np.mean(t0 <= horizon))
    stacked = np.concatenate([t1, t0])
    fit = _hazard_ratio(
        np.minimum(stacked, horizon),
        stacked <= horizon,
        np.concatenate([np.ones(n), np.zeros(n)]),
    )
    return EffectInTreated(
        n_treated=n,
        horizon_days=horizon,
        risk_treated=risk1,
        risk_untreated=risk0,
        risk_ratio=risk1 / risk0 if risk0 > 0 else None,
        risk_difference=risk1 - risk0,
        hr_marginal=None if fit is None else fit.hr,
        log_hr_marginal=None if fit is None else fit.log_hr,
    )


def expected_cohort(
    n_cud: int, attrition: dict[str, list[int]], rows: CohortRows
) -> ExpectedCohort:
    """The expected cohort of a site (or of the network, from summed attrition)."""
    exposed, comparator = rows.exposed, ~rows.exposed
    sums = np.rint(rows.covariates).astype(np.int64)
    return ExpectedCohort(
        n_cud=n_cud,
        attrition=[
            AttritionStep(rule=rule, n_exposed=n_exposed, n_comparator=n_comparator)
            for rule, (n_exposed, n_comparator) in attrition.items()
        ],
        n_exposed=int(exposed.sum()),
        n_comparator=int(comparator.sum()),
        events_exposed=int(rows.event[exposed].sum()),
        events_comparator=int(rows.event[comparator].sum()),
        person_days_exposed=int(rows.time[exposed].sum()),
        person_days_comparator=int(rows.time[comparator].sum()),
        covariate_sums_exposed=dict(
            zip(COVARIATES, (int(v) for v in sums[exposed].sum(axis=0)), strict=True)
        ),
        covariate_sums_comparator=dict(
            zip(COVARIATES, (int(v) for v in sums[comparator].sum(axis=0)), strict=True)
        ),
    )


def network_cohort(
    tallies: dict[str, SiteCohortTally],
) -> tuple[ExpectedCohort, CohortRows, np.ndarray]:
    """The network's expected cohort, all rows, and each row's site index."""
    rows = [t.rows() for t in tallies.values()]
    rules = next(iter(tallies.values())).rules
    attrition = {
        r: [sum(t.attrition[r][k] for t in tallies.values()) for k in (0, 1)] for r in rules
    }
    pooled = CohortRows(
        *(np.concatenate([getattr(r, f) for r in rows]) for f in CohortRows.__dataclass_fields__)
    )
    site_of_row = np.concatenate([np.full(len(r.time), k) for k, r in enumerate(rows)])
    n_cud = sum(t.n_cud for t in tallies.values())
    return expected_cohort(n_cud, attrition, pooled), pooled, site_of_row


def crude_hazard_ratio(rows: CohortRows, site_of_row: np.ndarray) -> CrudeHazardRatio:
    """Unadjusted HR of exposure, pooled and stratified by site."""
    x = rows.exposed.astype(np.float64)
    pooled = _hazard_ratio(rows.time, rows.event, x)
    stratified = _hazard_ratio(rows.time, rows.event, x, site_of_row)
    return CrudeHazardRatio(
        pooled=None if pooled is None else pooled.hr,
        site_stratified=None if stratified is None else stratified.hr,
    )
