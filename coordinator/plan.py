"""The study plan: which round comes next, and the central computation after each.

A plan is a small state machine, independent of the transport and of Prefect:

    plan = StudyPlan(protocol)
    while (request := plan.next_request()) is not None:
        plan.absorb(send_to_every_site(request))
    results = plan.analyses()

Round 1 carries everything one exchange can: attrition, per-arm counts, provenance, the
Cox derivatives at 0 and each site's local fit (the warm start). Later rounds are Halley
steps (Newton with the third derivative, cubic convergence) of the site-stratified Cox
model until the step is below ``tolerance``; the last step is then taken centrally and
the Hessian moved to the final estimate with the third derivative, so the estimate and
its SE are exact to O(step^3) and O(step^2), far below 1e-8, one exchange earlier.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.errors import ConvergenceError, InsufficientSites, SiteError
from shared.protocol.messages import RoundReply, RoundRequest
from shared.protocol.model import StudyProtocol
from shared.stats.cox import CoxDerivatives, halley_step, newton_step
from shared.stats.inference import wald_ratio

_ARMS = ("exposed", "comparator")


@dataclass
class _Newton:
    beta: float
    iterations: int = 0
    previous: tuple[float, float] | None = None  # (beta, loglik) of the last evaluated point
    final: dict[str, Any] | None = None


@dataclass
class StudyPlan:
    """Rounds and central computations of a study (for now: counts and the crude Cox HR)."""

    protocol: StudyProtocol
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tolerance: float = 1e-6
    max_newton_rounds: int = 25
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    _round: int = 0
    _newton: _Newton | None = None

    def next_request(self) -> RoundRequest | None:
        """The next round's request, or None when the study is complete."""
        if self._round == 0:
            tasks: dict[str, dict[str, Any]] = {
                "provenance": {}, "attrition": {}, "arm_summary": {},
                "crude_cox": {"beta": 0.0, "local_fit": True},
            }
            return self._request("summary", tasks)
        assert self._newton is not None
        if self._newton.final is not None:
            return None
        if self._newton.iterations >= self.max_newton_rounds:
            raise ConvergenceError(
                f"study {self.protocol.study_id!r}: the crude Cox fit did not converge in "
                f"{self.max_newton_rounds} Newton rounds (last beta {self._newton.beta!r}). "
                f"Fix: check per-arm event counts in the attrition; an arm without events has no MLE."
            )
        return self._request("cox-newton", {"crude_cox": {"beta": self._newton.beta}})

    def _request(self, name: str, tasks: dict[str, dict[str, Any]]) -> RoundRequest:
        return RoundRequest(
            study_id=self.protocol.study_id,
            run_id=self.run_id,
            round_name=f"{self._round + 1}-{name}",
            round_index=self._round + 1,
            protocol=self.protocol.model_dump(mode="json"),
            protocol_sha256=self.protocol.sha256(),
            tasks=tasks,
        )

    def absorb(self, replies: dict[str, RoundReply]) -> None:
        """Take every site's reply to the current round and run the central step."""
        for site_id, reply in replies.items():
            if reply.status != "ok":
                raise SiteError(site_id, reply.error or f"status {reply.status} without a reason")
        if not replies:
            raise InsufficientSites(f"study {self.protocol.study_id!r}: no site answered")
        if self._round > 0 and set(replies) != set(self.sites):
            raise InsufficientSites(
                f"study {self.protocol.study_id!r}: round {self._round + 1} got replies from "
                f"{sorted(replies)} but the study started with {sorted(self.sites)}; a Newton fit "
                f"cannot change sites half-way. Fix: rerun the study when all sites are up."
            )
        if self._round == 0:
            self._absorb_summary(replies)
        else:
            self._absorb_newton(replies)
        self._round += 1

    def _absorb_summary(self, replies: dict[str, RoundReply]) -> None:
        local_fits = []
        for site_id, reply in sorted(replies.items()):
            results = reply.results
            summary = results["arm_summary"]
            self.sites[site_id] = {
                "site_id": site_id,
                "n_exposed": summary["exposed"]["n"],
                "n_comparator": summary["comparator"]["n"],
                "events_exposed": summary["exposed"]["events"],
                "events_comparator": summary["comparator"]["events"],
                "person_days_exposed": summary["exposed"]["person_days"],
                "person_days_comparator": summary["comparator"]["person_days"],
                "attrition": results["attrition"]["steps"],
                "provenance": results["provenance"],
            }
            if results["crude_cox"].get("local_fit"):
                local_fits.append(results["crude_cox"]["local_fit"])
        if local_fits:  # inverse-variance weighted mean of the sites' own fits
            weights = np.array([1.0 / fit["variance"] for fit in local_fits])
            betas = np.array([fit["beta"] for fit in local_fits])
            start = float(np.sum(weights * betas) / np.sum(weights))
        else:
            total = _total(replies)
            start = float(newton_step(np.zeros(1), total).beta[0])
        self._newton = _Newton(beta=start)

    def _absorb_newton(self, replies: dict[str, RoundReply]) -> None:
        assert self._newton is not None
        state = self._newton
        total = _total(replies)
        state.iterations += 1
        if state.previous is not None and total.loglik < state.previous[1] - 1e-9 * abs(state.previous[1]):
            state.beta = 0.5 * (state.beta + state.previous[0])  # overshoot: halve the step
            return
        update = halley_step(state.beta, total)
        state.previous = (state.beta, total.loglik)
        if update.max_abs_step < self.tolerance:
            step = float(update.step[0])
            hessian = float(total.hessian[0, 0]) + (total.third or 0.0) * step
            se = float(np.sqrt(-1.0 / hessian))
            state.final = {"beta": float(update.beta[0]), "se": se, "loglik": total.loglik}
        else:
            state.beta = float(update.beta[0])

    def analyses(self) -> dict[str, Any]:
        """The study's estimates once :meth:`next_request` returned None."""
        assert self._newton is not None
        assert self._newton.final is not None
        final = self._newton.final
        ratio = wald_ratio(final["beta"], final["se"])
        counts = {
            f"{key}_{arm}": sum(site[f"{key}_{arm}"] for site in self.sites.values())
            for key in ("n", "events", "person_days") for arm in _ARMS
        }
        crude = {
            "model": "Cox proportional hazards, Breslow ties, stratified by site, treatment only",
            "site_stratified": True,
            "hr": ratio.estimate,
            "ci_low": ratio.ci_low,
            "ci_high": ratio.ci_high,
            "ci_level": ratio.level,
            "log_hr": ratio.log_estimate,
            "se_log_hr": ratio.se,
            "p_value": ratio.p_value,
            "loglik": final["loglik"],
            "newton_rounds": self._newton.iterations,
            "converged": True,
            **counts,
        }
        return {"crude": crude}


def _total(replies: dict[str, RoundReply]) -> CoxDerivatives:
    parts = [CoxDerivatives.from_json(reply.results["crude_cox"]) for _, reply in sorted(replies.items())]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
