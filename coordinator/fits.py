"""Central halves of the iterative fits: each takes the sites' partials and proposes the next point.

Every fit follows one life cycle, driven by :class:`coordinator.plan.StudyPlan`:
round 1 asks for the derivatives at a starting point plus each site's own fit
(``first_params``); ``warm_start`` then combines the sites' fits into a better start;
later rounds ask for the derivatives at ``next_params`` until the fit reports
``converged``. Several fits share the same rounds.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Any

import numpy as np

from shared.errors import ConvergenceError
from shared.protocol.model import StudyProtocol
from shared.stats.cox import CoxDerivatives, NewtonStep, halley_step, newton_step
from shared.stats.inference import wald_ratio
from shared.stats.logistic import (
    LogisticDerivatives,
    LogisticStep,
    logistic_covariance,
    penalized_newton_step,
)

Partials = list[dict[str, Any]]  # one task's results from every site, in site order


class _HalleyFit:
    """One log HR by Halley steps over rounds, warm-started from the sites' own fits."""

    def __init__(self) -> None:
        self.beta = 0.0
        self.iterations = 0
        self.final: dict[str, Any] | None = None
        self.error: str | None = None
        self._previous: tuple[float, float] | None = None

    @property
    def converged(self) -> bool:
        return self.final is not None or self.error is not None

    def give_up(self, reason: str) -> None:
        """No estimate (an arm without events, a site that refused the model): say why, stop."""
        self.error = reason

    def _warm_start_from(self, local_fits: list[dict[str, float] | None]) -> bool:
        """Inverse-variance weighted mean of the sites' own fits; False when no site has one."""
        fits = [fit for fit in local_fits if fit]
        if not fits:
            return False
        weights = np.array([1.0 / fit["variance"] for fit in fits])
        self.beta = float(np.sum(weights * np.array([fit["beta"] for fit in fits])) / np.sum(weights))
        return True

    def _step(self, total: CoxDerivatives) -> NewtonStep | None:
        """The next Halley step, or None after halving a step that lowered the likelihood."""
        self.iterations += 1
        if self._previous is not None and total.loglik < self._previous[1] - 1e-9 * abs(self._previous[1]):
            self.beta = 0.5 * (self.beta + self._previous[0])  # overshoot: halve the step
            return None
        self._previous = (self.beta, total.loglik)
        return halley_step(self.beta, total)


class CrudeCoxFit(_HalleyFit):
    """Site-stratified Cox model with treatment only, by Halley steps (one parameter).

    With the third derivative the last step is taken centrally and the Hessian moved to
    the final estimate, so estimate and SE are exact to far below 1e-8 one exchange early.
    """

    task = "crude_cox"
    MODEL = "Cox proportional hazards, Breslow ties, stratified by site, treatment only"

    def __init__(self, tolerance: float = 1e-6, max_rounds: int = 25) -> None:
        super().__init__()
        self.tolerance = tolerance
        self.max_rounds = max_rounds

    def first_params(self) -> dict[str, Any]:
        return {"beta": 0.0, "local_fit": True}

    def warm_start(self, partials: Partials) -> None:
        """Inverse-variance weighted mean of the sites' own fits (else one step from 0)."""
        if not self._warm_start_from([p.get("local_fit") for p in partials]):
            self.beta = float(newton_step(np.zeros(1), _sum_cox(partials)).beta[0])

    def next_params(self) -> dict[str, Any]:
        if self.iterations >= self.max_rounds:
            raise ConvergenceError(
                f"the crude Cox fit did not converge in {self.max_rounds} rounds (last log HR "
                f"{self.beta!r}). Fix: check per-arm event counts; an arm without events has no MLE."
            )
        return {"beta": self.beta}

    def absorb(self, partials: Partials) -> None:
        total = _sum_cox(partials)
        update = self._step(total)
        if update is None:
            return
        if update.max_abs_step < self.tolerance:
            step = float(update.step[0])
            hessian = float(total.hessian[0, 0]) + (total.third or 0.0) * step
            self.final = {"beta": float(update.beta[0]), "se": float(np.sqrt(-1.0 / hessian)), "loglik": total.loglik}
        else:
            self.beta = float(update.beta[0])

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            return {"model": self.MODEL, "site_stratified": True, "error": self.error}
        assert self.final is not None
        ratio = wald_ratio(self.final["beta"], self.final["se"])
        return {
            "model": self.MODEL,
            "site_stratified": True,
            "hr": ratio.estimate, "ci_low": ratio.ci_low, "ci_high": ratio.ci_high,
            "ci_level": ratio.level, "log_hr": ratio.log_estimate, "se_log_hr": ratio.se,
            "p_value": ratio.p_value, "loglik": self.final["loglik"],
            "newton_rounds": self.iterations, "converged": True,
        }


class PropensityFit:
    """Logistic propensity model by distributed Newton-Raphson (optional central L2).

    Newton converges quadratically: once a step is below ``tolerance`` the updated
    coefficients are within about ``tolerance**2`` of the maximum. They become the final
    point, and one more round (the adjusted analyses' round, which needs them anyway)
    brings the derivatives there: the SEs come from the information at the final point,
    and the size of the step that would follow is reported as the check of convergence.
    """

    task = "propensity"

    def __init__(self, protocol: StudyProtocol, tolerance: float = 1e-6, max_rounds: int = 25) -> None:
        self.columns = protocol.propensity_columns()
        self.l2 = protocol.propensity.l2
        self.tolerance = tolerance
        self.max_rounds = max_rounds
        self.beta = np.zeros(len(self.columns))
        self.iterations = 0
        self.gram: np.ndarray | None = None  # X'X over all sites (from the Hessian at 0)
        self.converged = False
        self.final: dict[str, Any] | None = None
        self.error: str | None = None

    def give_up(self, reason: str) -> None:
        """The model has no estimate (e.g. a site refused to evaluate it): say why, stop iterating."""
        self.error = reason
        self.converged = True

    def first_params(self) -> dict[str, Any]:
        return {"beta": self.beta.tolist(), "local_fit": True}

    def warm_start(self, partials: Partials) -> None:
        """Information-weighted mean of the sites' own fits (else one Newton step from 0)."""
        at_zero = _sum_logistic(partials)
        self.gram = -4.0 * at_zero.hessian  # p (1 - p) = 1/4 exactly at beta = 0
        fits = [p["local_fit"] for p in partials if p.get("local_fit")]
        if fits:
            information = sum(np.asarray(f["information"]) for f in fits)
            weighted = sum(np.asarray(f["information"]) @ np.asarray(f["beta"]) for f in fits)
            try:
                self.beta = np.linalg.solve(information, weighted)
                return
            except np.linalg.LinAlgError:
                pass
        self.beta = self._step(at_zero).beta

    def _step(self, total: LogisticDerivatives) -> LogisticStep:
        try:
            return penalized_newton_step(self.beta, total, self.l2)
        except ConvergenceError as error:
            constant = self.constant_columns()
            if constant:
                raise ConvergenceError(
                    f"the propensity model cannot be fitted: covariate(s) {constant} take one value "
                    f"in every site's cohort. Fix: remove them from the protocol's covariates."
                ) from error
            raise

    def constant_columns(self) -> list[str]:
        """Covariates with no variation over all sites (from X'X; needs round 1)."""
        if self.gram is None:
            return []
        n = self.gram[0, 0]
        variance = np.diag(self.gram) / n - (self.gram[0] / n) ** 2
        scale = np.maximum(1.0, np.diag(self.gram) / n)
        return [c for c, v, s in zip(self.columns[1:], variance[1:], scale[1:], strict=True) if v <= 1e-12 * s]

    def next_params(self) -> dict[str, Any]:
        if self.iterations >= self.max_rounds:
            raise ConvergenceError(
                f"the propensity model did not converge in {self.max_rounds} rounds. Fix: look for "
                f"a covariate that (almost) separates the arms, or set propensity.l2 in the protocol."
            )
        return {"beta": self.beta.tolist()}

    def absorb(self, partials: Partials) -> None:
        update = self._step(_sum_logistic(partials))
        self.iterations += 1
        self.beta = update.beta
        self.converged = update.max_abs_step < self.tolerance

    def finish(self, partials: Partials) -> None:
        """Take the derivatives at the final point: SEs there, and the step that would follow."""
        total = _sum_logistic(partials)
        after = penalized_newton_step(self.beta, total, self.l2)
        se = np.sqrt(np.diag(logistic_covariance(total, self.l2)))
        self.final = {
            "beta": self.beta, "se": se, "loglik": total.loglik, "n": total.n,
            "next_step": after.max_abs_step,
        }

    def logit_sd(self) -> float:
        """SD of the linear predictor over all rows at the final point (exact, from X'X)."""
        assert self.gram is not None
        n = float(self.gram[0, 0])
        mean = float(self.gram[0] @ self.beta) / n
        second = float(self.beta @ self.gram @ self.beta) / n
        return float(np.sqrt(max(second - mean * mean, 0.0) * n / (n - 1.0)))

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            return {
                "model": "logistic regression of treatment on the protocol's covariates", "l2": self.l2,
                "error": self.error, "newton_rounds": self.iterations, "coefficients": {}, "standard_errors": {},
            }
        assert self.final is not None
        return {
            "model": "logistic regression of treatment on the protocol's covariates",
            "l2": self.l2,
            "coefficients": dict(zip(self.columns, self.final["beta"].tolist(), strict=True)),
            "standard_errors": dict(zip(self.columns, self.final["se"].tolist(), strict=True)),
            "loglik": self.final["loglik"],
            "n": self.final["n"],
            "newton_rounds": self.iterations,
            "converged": True,
            "convergence_check": {
                "rule": f"Newton step below {self.tolerance:g}; SEs at the final point",
                "max_abs_next_step": self.final["next_step"],
            },
        }


class WeightedCoxFit(_HalleyFit):
    """One analysis's (weighted) site-stratified Cox fit by Halley rounds, for sites that keep event tables.

    Warm-started from the sites' own fits; once a Halley step is below ``tolerance`` (the
    next iterate is then within about ``tolerance**3``), a final round brings, at that
    point, the derivatives (model SE), the robust meat (robust SE) and the score and
    information per follow-up window (the PH check's score test).
    """

    task = "weighted_cox"

    def __init__(self, name: str, robust: bool, tolerance: float = 1e-5, max_rounds: int = 25) -> None:
        super().__init__()
        self.name, self.robust = name, robust
        self.tolerance, self.max_rounds = tolerance, max_rounds
        self.at_point = False

    def warm_start(self, local_fits: list[dict[str, float] | None]) -> None:
        """Inverse-variance weighted mean of the sites' own fits (0 when no site has one)."""
        self._warm_start_from(local_fits)

    def next_params(self) -> dict[str, Any]:
        if self.iterations >= self.max_rounds:
            raise ConvergenceError(
                f"the {self.name} Cox model did not converge in {self.max_rounds} rounds (last log HR "
                f"{self.beta!r}). Fix: check its per-arm event counts."
            )
        return {"beta": self.beta, "final": True} if self.at_point else {"beta": self.beta}

    def absorb(self, partials: Partials) -> None:
        total = _sum_cox(partials)
        if self.at_point:
            information = -float(total.hessian[0, 0])
            meat = float(sum(p["meat"] for p in partials))
            windows = np.sum([np.asarray(p["windows"], dtype=np.float64) for p in partials], axis=0)
            window_meat = np.sum([np.asarray(p["window_meat"], dtype=np.float64) for p in partials], axis=0)
            self.final = {
                "log_hr": self.beta, "information": information, "meat": meat, "windows": windows,
                "window_meat": window_meat,
                "next_step": abs(float(halley_step(self.beta, total).step[0])),
            }
            return
        update = self._step(total)
        if update is not None:
            self.beta = float(update.beta[0])
            self.at_point = update.max_abs_step < self.tolerance


def _sum_cox(partials: Partials) -> CoxDerivatives:
    return reduce(operator.add, (CoxDerivatives.from_json(p) for p in partials))


def _sum_logistic(partials: Partials) -> LogisticDerivatives:
    return reduce(operator.add, (LogisticDerivatives.from_json(p) for p in partials))
