"""Partial computations of counts: attrition and per-arm totals."""

from __future__ import annotations

from shared.stats.cox import EventTable
from site_agent.analyses.release import Release
from site_agent.cohort.builder import AttritionStep

ARMS = {1: "exposed", 0: "comparator"}


def _shown_steps(values: list[int], min_cell_count: int) -> list[bool]:
    """Which counts of a decreasing sequence can be shown so that every difference between
    consecutive shown counts is 0 or at least ``min_cell_count``. The last is always shown
    (it is the cohort size, released anyway); earlier ones are kept greedily backwards."""
    shown = [False] * len(values)
    shown[-1] = True
    last = values[-1]
    for i in range(len(values) - 2, -1, -1):
        removed = values[i] - last
        if removed == 0 or removed >= min_cell_count:
            shown[i] = True
            last = values[i]
    return shown


def attrition(steps: list[AttritionStep], min_cell_count: int) -> Release:
    """Persons remaining after each inclusion rule, per arm.

    A step that removes between 1 and ``min_cell_count - 1`` persons of an arm would name
    them by difference, so such counts are suppressed (shown as null, ``suppressed: true``)
    until every difference a reader can take is 0 or at least the minimum; the final
    counts are always shown. Every shown count and difference is also checked by the guard.
    """
    arm_steps = [s for s in steps if s.n_exposed is not None and s.n_comparator is not None]
    shown = {
        arm: _shown_steps([getattr(s, f"n_{arm}") for s in arm_steps], min_cell_count)
        for arm in ("exposed", "comparator")
    }
    released: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    last: dict[str, int] = {}
    for step in steps:
        row = step.to_json()
        if step in arm_steps:
            index = arm_steps.index(step)
            for arm in ("exposed", "comparator"):
                value = getattr(step, f"n_{arm}")
                if shown[arm][index]:
                    counts[f"attrition.{step.step}.n_{arm}"] = value
                    if arm in last:
                        counts[f"attrition.{step.step}.removed_{arm}"] = last[arm] - value
                    last[arm] = value
                else:
                    row[f"n_{arm}"] = None
            if row["n_exposed"] is None or row["n_comparator"] is None:
                row["n_persons"] = None
            row["suppressed"] = row["n_persons"] is None
        if row["n_persons"] is not None:
            counts[f"attrition.{step.step}.n_persons"] = int(step.n_persons)
        released.append(row)
    return Release({"steps": released}, counts)


def arm_summary(table: EventTable) -> Release:
    """Persons, events and person-days per arm, from the event table.

    Under a ``suppress`` policy a small arm is sent as null and a small number of events as
    a null ``events``."""
    values: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {}
    for arm, name in ARMS.items():
        n = int(table.exits[arm].sum())
        events = int(table.events[arm].sum())
        person_days = int((table.exits[arm] * table.time).sum())
        values[name] = {"n": n, "events": events, "person_days": person_days}
        counts[f"{name}.n"] = n
        counts[f"{name}.events"] = events
    # a suppressed arm size blanks the whole arm (its person-days would describe its few persons)
    paths: dict[str, tuple[str | int, ...]] = {}
    for name in ARMS.values():
        paths[f"{name}.n"] = (name, "n")
        paths[f"{name}.events"] = (name, "events")
    return Release(values, counts, paths=paths, hides={f"{name}.n": (name,) for name in ARMS.values()})
