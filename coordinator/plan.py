"""The study plan: which round comes next, and the central computation after each.

A plan is a small state machine, independent of the transport and of Prefect:

    plan = StudyPlan(protocol)
    while (request := plan.next_request()) is not None:
        plan.absorb(send_to_every_site(request))
    results = plan.analyses()

Round 1 carries everything one exchange can: attrition, per-arm counts, provenance, and
for every iterative fit (coordinator/fits.py) its derivatives at a start and each site's
own fit. Later rounds carry one step of every fit that has not converged yet, together.
When the propensity model has converged, a last round brings its derivatives at the final
point and, with it, every propensity-score analysis (coordinator/adjusted.py), which the
coordinator then computes without another exchange. With large-scale covariates the
summary round also brings each site's releasable concepts; the coordinator chooses the
common list (coordinator/large_scale.py) and the propensity model starts in round 2.

With secure aggregation (``protocol.secure_aggregation``) round 1 carries the summary
tasks and every site's public key for the run, and no model: every fit starts in round 2
at its plain start (no sites' own fits, which are per-site values), and every model task
comes back as masked vectors that the plan unmasks into their sum over sites before a fit
sees them (coordinator/secure_sum.py). A site lost mid-fit ends the run: the masks of the
others cannot be removed without it, so the study reruns on the remaining sites with new
keys (docs/privacy.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from coordinator import adjusted, large_scale, secure_sum
from coordinator.fits import CrudeCoxFit, PropensityFit, WeightedCoxFit
from shared.errors import InsufficientSites, SiteError
from shared.protocol.messages import RoundReply, RoundRequest
from shared.protocol.model import StudyProtocol

_ARMS = ("exposed", "comparator")
_SUMMARY_TASKS = ("provenance", "attrition", "arm_summary")
DISCLOSURE_KEY = "disclosure"  # a reply's label of what its site's guard suppressed or noised


def _total(values: Iterable[int | None]) -> int | None:
    """The sum over sites, or None when a site suppressed its value (shown as suppressed)."""
    listed = list(values)
    return None if any(v is None for v in listed) else sum(v for v in listed if v is not None)


@dataclass
class StudyPlan:
    """Rounds and central computations of one comparison of one run of a study.

    ``study`` is the whole protocol (what requests carry and sites approve); ``protocol``
    is the comparison's single-comparison protocol (``study.resolve(comparison)``), which
    every estimator reads.
    """

    study: StudyProtocol
    comparison: str | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    participants: list[str] | None = None  # None: every site that answers the first round
    attempt: int = 1  # > 1 after a restart without sites that dropped out (flows/study.py)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    _round: int = 0

    def __post_init__(self) -> None:
        self.protocol = self.study.resolve(self.comparison)
        self.crude = CrudeCoxFit()
        self.fits: list[CrudeCoxFit | PropensityFit] = [self.crude]
        self.propensity_fit: PropensityFit | None = None
        if "propensity" in self.protocol.analyses:
            self.propensity_fit = large_scale.propensity_fit_for(self.protocol)
            self.fits.append(self.propensity_fit)
        self.adjusted: dict[str, Any] | None = None
        self.event_tables = True  # False when any site's policy keeps event tables at the site
        self.cox_fits: dict[str, WeightedCoxFit] = {}
        self._adjusted_partials: list[dict[str, Any]] | None = None
        self._final_round_done = False
        self._kind = "summary"
        self._site_ids: list[str] = []
        self.adjusted_error: str | None = None
        self.secure = self.protocol.secure_aggregation
        self.peer_keys: dict[str, dict[str, str]] = {}  # site id -> key announcement for this run (secure aggregation)
        self._round_name = ""
        self._unstarted = {fit.task for fit in self.fits if self.secure and not large_scale.waits_for_selection(fit)}

    def next_request(self) -> RoundRequest | None:
        """The next round's request, or None when the study is complete."""
        if self._round == 0:
            tasks: dict[str, dict[str, Any]] = {task: {} for task in _SUMMARY_TASKS}
            if self.secure:
                tasks[secure_sum.KEY_TASK] = {}
            else:
                tasks.update({fit.task: fit.first_params() for fit in self.fits if not large_scale.waits_for_selection(fit)})
            if self.protocol.large_scale_covariates is not None:
                tasks[large_scale.CONCEPT_TASK] = {}
            return self._request("summary", tasks)
        pending = [fit for fit in self.fits if not fit.converged]
        if pending:
            return self._request("newton", {fit.task: self._fit_params(fit) for fit in pending})
        if self.propensity_fit is None or self.propensity_fit.error is not None:
            return None
        if not self._final_round_done:
            tasks = {"propensity": {"beta": self.propensity_fit.beta.tolist(), **large_scale.concept_params(self.propensity_fit)}}
            if self.protocol.adjusted_analyses():
                tasks["adjusted"] = {**self._adjusted_params(), "event_tables": self.event_tables}
            return self._request("adjusted", tasks)
        cox_pending = {name: fit.next_params() for name, fit in self.cox_fits.items() if not fit.converged}
        if cox_pending:
            return self._request("cox", {WeightedCoxFit.task: {"propensity": self._adjusted_params(), "fits": cox_pending}})
        return None

    @property
    def rounds_absorbed(self) -> int:
        """How many rounds' replies the plan has taken in (0: nothing central computed yet)."""
        return self._round

    def _fit_params(self, fit: CrudeCoxFit | PropensityFit) -> dict[str, Any]:
        """A fit's next point; under secure aggregation its first point, without the sites' own fits."""
        if not self.secure:
            return fit.next_params()
        params = fit.first_params() if fit.task in self._unstarted else fit.next_params()
        return {name: value for name, value in params.items() if name != "local_fit"}

    def _adjusted_params(self) -> dict[str, Any]:
        assert self.propensity_fit is not None
        n_exposed = _total(site["n_exposed"] for site in self.sites.values())
        n_comparator = _total(site["n_comparator"] for site in self.sites.values())
        if n_exposed is None or n_comparator is None:
            site_id = next(s for s, site in sorted(self.sites.items()) if None in (site["n_exposed"], site["n_comparator"]))
            raise SiteError(site_id, (
                "its policy suppressed an arm size, which the propensity-score weights need. Fix: run the "
                "study without this site, or widen the cohort so that both arms reach its minimum cell count."
            ))
        n_total = n_exposed + n_comparator
        return {
            "beta": self.propensity_fit.beta.tolist(),
            "caliper": self.protocol.matching.caliper * self.propensity_fit.logit_sd(),
            "exposed_share": n_exposed / n_total,
            **large_scale.concept_params(self.propensity_fit),
        }

    def _request(self, name: str, tasks: dict[str, dict[str, Any]]) -> RoundRequest:
        self._kind = name
        prefix = f"{self.comparison}/" if self.comparison else ""
        if self.attempt > 1:
            prefix += f"attempt-{self.attempt}/"
        self._round_name = f"{prefix}{self._round + 1}-{name}"
        return RoundRequest(
            study_id=self.study.study_id,
            run_id=self.run_id,
            round_name=self._round_name,
            round_index=self._round + 1,
            protocol=self.study.model_dump(mode="json"),
            protocol_sha256=self.study.sha256(),
            comparison=self.comparison,
            participants=sorted(self.sites) if self._round > 0 else self.participants,
            tasks=tasks,
            secure_aggregation_peers=dict(self.peer_keys) if self.secure and self._round > 0 else None,
        )

    def absorb(self, replies: dict[str, RoundReply]) -> None:
        """Take every site's reply to the current round and run the central steps."""
        for site_id, reply in replies.items():
            if reply.status != "ok":
                raise SiteError(site_id, reply.error or f"status {reply.status} without a reason")
        if not replies:
            raise InsufficientSites(f"study {self.protocol.study_id!r}: no site answered")
        if self._round > 0 and set(replies) != set(self.sites) and self.secure:
            raise InsufficientSites(secure_sum.lost_sites_message(self.protocol.study_id, self._round_name, self.sites, replies))
        if self._round > 0 and set(replies) != set(self.sites):
            raise InsufficientSites(
                f"study {self.protocol.study_id!r}: round {self._round + 1} got replies from "
                f"{sorted(replies)} but the study started with {sorted(self.sites)}; a Newton fit "
                f"cannot change sites half-way. Fix: rerun the study when all sites are up."
            )
        ordered = [replies[site_id].results for site_id in sorted(replies)]
        self._site_ids = sorted(replies)
        if self._kind == "summary":
            self._absorb_summaries(replies, ordered)
        elif self._kind == "newton":
            for fit in self.fits:
                if fit.task in ordered[0] and (partials := self._model_partials(fit, [r[fit.task] for r in ordered])):
                    if fit.task in self._unstarted:
                        self._unstarted.discard(fit.task)
                        fit.warm_start(partials)  # no sites' own fits: one Newton step from the start
                    else:
                        fit.absorb(partials)
        elif self._kind == "adjusted":
            assert self.propensity_fit is not None
            if partials := self._model_partials(self.propensity_fit, [r["propensity"] for r in ordered]):
                self.propensity_fit.finish(partials)
            if "adjusted" in ordered[0] and self.propensity_fit.error is None:
                withheld = self._withheld([r["adjusted"] for r in ordered])
                if withheld:
                    self.adjusted_error = f"the adjusted analyses were withheld by {withheld}"
                else:
                    self._absorb_adjusted([r["adjusted"] for r in ordered], sorted(replies))
            self._final_round_done = True
        else:  # "cox": a step (or the final round) of every weighted Cox fit still open
            tasks = [r[WeightedCoxFit.task] for r in ordered]
            for name, cox_fit in self.cox_fits.items():
                if cox_fit.converged:
                    continue
                parts = [t["parts"][name] if "parts" in t else t for t in tasks]
                if partials := self._usable(cox_fit, parts):
                    cox_fit.absorb(partials)
            if all(fit.converged for fit in self.cox_fits.values()):
                assert self._adjusted_partials is not None
                self.adjusted = self._combine(self._adjusted_partials, sorted(replies), self.cox_fits)
        self._round += 1

    def _absorb_summaries(self, replies: dict[str, RoundReply], ordered: list[dict[str, Any]]) -> None:
        for site_id in sorted(replies):
            self._absorb_summary(site_id, replies[site_id].results)
        if self.secure:
            self.peer_keys = secure_sum.peer_keys(self.protocol.study_id, self._site_ids, ordered)
        self.event_tables = all(site["provenance"].get("event_tables_allowed", True) for site in self.sites.values())
        without_events = [arm for arm in _ARMS if _total(s[f"events_{arm}"] for s in self.sites.values()) == 0]
        if without_events:
            self.crude.give_up(
                f"no finite hazard ratio: the {' and '.join(without_events)} arm has no events at any "
                f"site. Fix: lengthen the time at risk or check the outcome's codes."
            )
        for fit in self.fits:
            if large_scale.waits_for_selection(fit):
                assert isinstance(fit, large_scale.LargeScalePropensityFit)
                fit.choose(large_scale.select_concepts(
                    self._site_ids, [r[large_scale.CONCEPT_TASK] for r in ordered], fit.max_covariates,
                ))
            elif not self.secure and not fit.converged and (partials := self._usable(fit, [r[fit.task] for r in ordered])):
                fit.warm_start(partials)

    def _withheld(self, partials: list[dict[str, Any]]) -> str:
        """Which sites withheld a task and why ('' when none did)."""
        return "; ".join(
            f"site {site!r} ({part['withheld']})" for site, part in zip(self._site_ids, partials, strict=True)
            if "withheld" in part
        )

    def _usable(self, fit: CrudeCoxFit | PropensityFit | WeightedCoxFit, partials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The partials, or [] after the fit gave up because a site withheld its task."""
        withheld = self._withheld(partials)
        if withheld:
            fit.give_up(f"no estimate: withheld by {withheld}")
            return []
        return partials

    def _model_partials(self, fit: CrudeCoxFit | PropensityFit, partials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The sites' partials of a model task; under secure aggregation, their unmasked sum alone."""
        usable = self._usable(fit, partials)
        if not usable or not self.secure:
            return usable
        return [secure_sum.unmask(fit.task, self.run_id, self._round_name, self._site_ids, usable)]

    def _absorb_adjusted(self, partials: list[dict[str, Any]], site_ids: list[str]) -> None:
        """With event tables everything is central now; without, weighted Cox fits start."""
        if all(p["event_tables"] for p in partials):
            self.adjusted = self._combine(partials, site_ids)
            return
        self._adjusted_partials = partials
        for name in ("crude", *self.protocol.adjusted_analyses()):
            parts = [p["parts"][name] for p in partials]
            if name == "matched" or any("withheld" in part for part in parts):
                continue  # matching needs no rounds; a withheld analysis has no pooled fit
            cox_fit = WeightedCoxFit(name, robust=name != "crude")
            cox_fit.warm_start([part.get("local_fit") for part in parts])
            self.cox_fits[name] = cox_fit
        if not self.cox_fits:
            self.adjusted = self._combine(partials, site_ids, self.cox_fits)

    def _combine(
        self, partials: list[dict[str, Any]], site_ids: list[str], cox_fits: dict[str, WeightedCoxFit] | None = None,
    ) -> dict[str, Any]:
        """The adjusted analyses' central half, with the balance of the concept columns too."""
        concepts = large_scale.concept_columns(self.propensity_fit)
        return adjusted.combine(self.protocol, partials, site_ids, cox_fits, concepts=concepts)

    def _absorb_summary(self, site_id: str, results: dict[str, Any]) -> None:
        """One site's counts; a count its policy suppressed is None, and the site's
        ``disclosure`` label (suppressed names, noisy counts) is kept with them."""
        summary = results["arm_summary"]
        arms = {arm: summary.get(arm) or {} for arm in _ARMS}  # a suppressed arm is None
        self.sites[site_id] = {
            "site_id": site_id,
            **{f"n_{arm}": arms[arm].get("n") for arm in _ARMS},
            **{f"events_{arm}": arms[arm].get("events") for arm in _ARMS},
            **{f"person_days_{arm}": arms[arm].get("person_days") for arm in _ARMS},
            "attrition": results["attrition"].get("steps", []),
            "provenance": results["provenance"],
        }
        # what the site's guard suppressed or noised, listed even when nothing was
        self.sites[site_id][DISCLOSURE_KEY] = results.get(DISCLOSURE_KEY) or {"suppressed": []}

    def analyses(self) -> dict[str, Any]:
        """The study's estimates once :meth:`next_request` returned None."""
        counts = {
            f"{key}_{arm}": _total(site[f"{key}_{arm}"] for site in self.sites.values())
            for key in ("n", "events", "person_days") for arm in _ARMS
        }
        crude = {**self.crude.result(), **counts}
        return self._labelled(self._estimates(crude))

    def _labelled(self, analyses: dict[str, Any]) -> dict[str, Any]:
        """Each analysis labelled with the sites' time grids when coarser than a day, and marked
        approximate when a site's counts carry noise (site policy ``dp_noise``)."""
        grids = {site_id: site["provenance"].get("time_grid", "day") for site_id, site in sorted(self.sites.items())}
        if any(grid != "day" for grid in grids.values()):
            note = (
                f"event tables on the sites' time grids {grids}: Kaplan-Meier, risks, log-rank and the Cox fits "
                f"from tables equal the pooled analysis on follow-up times rounded up to each site's grid"
            )
            analyses = {name: {**result, "time_grid": note} for name, result in analyses.items()}
        noisy = {site_id: site[DISCLOSURE_KEY]["noise"] for site_id, site in sorted(self.sites.items())
                 if "noise" in site.get(DISCLOSURE_KEY, {})}
        if not noisy:
            return analyses
        note = "approximate: counts from " + ", ".join(
            f"site {site_id!r} carry Laplace noise (epsilon {noise['epsilon']:g})" for site_id, noise in noisy.items()
        ) + "; totals and the exposed share used by the weights are then not exact"
        return {name: {**result, "approximate": note} for name, result in analyses.items()}

    def _estimates(self, crude: dict[str, Any]) -> dict[str, Any]:
        """The crude analysis completed from the tables, and every adjusted analysis (or its error)."""
        if self.adjusted is None:
            reason = self.adjusted_error or (
                None if self.propensity_fit is None or self.propensity_fit.error is None
                else f"the propensity model has no estimate ({self.propensity_fit.error})"
            )
            return {"crude": crude, **{name: {"error": reason} for name in self.protocol.adjusted_analyses() if reason}}
        from_tables = self.adjusted["analyses"]
        cox_fields = ("hr", "ci_low", "ci_high", "ci_level", "log_hr", "se_log_hr", "p_value", "model", "site_stratified")
        crude.update({k: v for k, v in from_tables["crude"].items() if k not in crude and k not in cox_fields})
        return {"crude": crude, **{name: from_tables[name] for name in self.protocol.adjusted_analyses()}}

    def propensity(self) -> dict[str, Any] | None:
        """The fitted propensity model (with the PS histogram when the adjusted round ran)."""
        if self.propensity_fit is None:
            return None
        result = self.propensity_fit.result()
        if self.adjusted is not None:
            result["caliper_logit"] = self.protocol.matching.caliper * self.propensity_fit.logit_sd()
            result["logit_sd"] = self.propensity_fit.logit_sd()
            result["histogram"] = self.adjusted["histogram"]
        return result

    def extras(self) -> dict[str, Any]:
        """``balance`` and ``meta`` for results.json, when the adjusted round ran."""
        if self.adjusted is None:
            return {}
        return {"balance": self.adjusted["balance"], "meta": self.adjusted["meta"]}
