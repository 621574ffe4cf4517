"""Partial computations of counts: attrition and per-arm totals."""

from __future__ import annotations

from shared.stats.cox import EventTable
from site_agent.analyses.release import Release
from site_agent.cohort.builder import AttritionStep

ARMS = {1: "exposed", 0: "comparator"}


def attrition(steps: list[AttritionStep]) -> Release:
    """Persons remaining after each inclusion rule; each step's removals are checked too."""
    counts: dict[str, int] = {}
    previous: AttritionStep | None = None
    for step in steps:
        counts[f"attrition.{step.step}.n_persons"] = step.n_persons
        for arm, value in (("exposed", step.n_exposed), ("comparator", step.n_comparator)):
            if value is None:
                continue
            counts[f"attrition.{step.step}.n_{arm}"] = value
            before = None if previous is None else getattr(previous, f"n_{arm}")
            if before is not None:  # a step that removes 1-9 persons would name them by difference
                counts[f"attrition.{step.step}.removed_{arm}"] = before - value
        previous = step
    return Release({"steps": [step.to_json() for step in steps]}, counts)


def arm_summary(table: EventTable) -> Release:
    """Persons, events and person-days per arm, from the event table."""
    values: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {}
    for arm, name in ARMS.items():
        n = int(table.exits[arm].sum())
        events = int(table.events[arm].sum())
        person_days = int((table.exits[arm] * table.time).sum())
        values[name] = {"n": n, "events": events, "person_days": person_days}
        counts[f"{name}.n"] = n
        counts[f"{name}.events"] = events
    return Release(values, counts)
