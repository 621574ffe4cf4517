"""Date checks: end before start, events outside observation, births and deaths.

Severities: an observation period that ends before it starts is an error (observation
time is the follow-up of every study); the rest are warnings. Dates shifted into the
future by de-identification (MIMIC-IV's 2100s) make every birth 'in the future': that
warning is expected there and harmless, since all dates are shifted alike.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from site_agent.ingest.lake import LakeView, any_by_row, numbered, rows_finding
from site_agent.ingest.report import Finding, Severity

# (start, end) date columns of the tables that have both.
PERIODS: dict[str, tuple[str, str]] = {
    "observation_period": ("observation_period_start_date", "observation_period_end_date"),
    "visit_occurrence": ("visit_start_date", "visit_end_date"),
    "visit_detail": ("visit_detail_start_date", "visit_detail_end_date"),
    "condition_occurrence": ("condition_start_date", "condition_end_date"),
    "drug_exposure": ("drug_exposure_start_date", "drug_exposure_end_date"),
    "procedure_occurrence": ("procedure_date", "procedure_end_date"),
    "device_exposure": ("device_exposure_start_date", "device_exposure_end_date"),
    "drug_era": ("drug_era_start_date", "drug_era_end_date"),
    "condition_era": ("condition_era_start_date", "condition_era_end_date"),
}
# The date of each clinical event, which should fall in an observation period.
EVENT_DATES: dict[str, str] = {
    "visit_occurrence": "visit_start_date",
    "visit_detail": "visit_detail_start_date",
    "condition_occurrence": "condition_start_date",
    "drug_exposure": "drug_exposure_start_date",
    "procedure_occurrence": "procedure_date",
    "device_exposure": "device_exposure_start_date",
    "measurement": "measurement_date",
    "observation": "observation_date",
}
_OBSERVED = ("person_id", "observation_period_start_date", "observation_period_end_date")


def date_findings(view: LakeView, today: dt.date) -> Iterator[Finding]:
    """Every date check of the lake."""
    yield from _end_before_start(view)
    yield from _outside_observation(view)
    yield from _births_and_deaths(view, today)


def _end_before_start(view: LakeView) -> Iterator[Finding]:
    for name, (start, end) in PERIODS.items():
        if not view.has(name):
            continue
        begins, ends = view.column(name, start), view.column(name, end)
        if begins is None or ends is None:
            continue
        severity: Severity = "error" if name == "observation_period" else "warning"
        yield from rows_finding(view, "end_before_start", severity, name, end, pc.less(ends, begins),
                                f"end before they start ({end} < {start})",
                                "correct the dates in the source and ingest again.")


def _outside_observation(view: LakeView) -> Iterator[Finding]:
    if not view.has("observation_period"):
        return
    periods = view.table("observation_period")
    if any(column not in periods.column_names for column in _OBSERVED):
        return
    periods = periods.select(list(_OBSERVED))
    persons = view.column("person", "person_id") if view.has("person") else None
    if persons is not None:
        unobserved = pc.invert(pc.is_in(persons, value_set=pc.unique(periods["person_id"])))
        yield from rows_finding(view, "no_observation_period", "warning", "person", "person_id",
                                unobserved, "have no observation period and can enter no cohort",
                                "give every person the periods they were observed in.")
    for name, date in EVENT_DATES.items():
        if not view.has(name) or view.column(name, date) is None:
            continue
        events = view.table(name)
        rows = numbered(person_id=events["person_id"], _date=events[date])
        joined = rows.join(periods, "person_id", join_type="left outer")
        inside = pc.and_kleene(pc.greater_equal(joined["_date"], joined[_OBSERVED[1]]),
                               pc.less_equal(joined["_date"], joined[_OBSERVED[2]]))
        yield from rows_finding(view, "outside_observation", "warning", name, date,
                                pc.invert(any_by_row(joined, inside)),
                                "fall outside every observation period of their person and are "
                                "ignored by the cohort rules",
                                "check the observation periods' dates in the source.")


def _keys(year: pa.ChunkedArray, month: pa.ChunkedArray | int, day: pa.ChunkedArray | int) -> pa.ChunkedArray:
    """Dates as comparable integers YYYYMMDD."""
    return pc.add(pc.add(pc.multiply(pc.cast(year, pa.int64()), 10_000), pc.multiply(month, 100)), day)


def _births_and_deaths(view: LakeView, today: dt.date) -> Iterator[Finding]:
    if not view.has("person") or view.column("person", "year_of_birth") is None:
        return
    person = view.table("person")
    parts = [pc.fill_null(person[c], 1) if c in person.column_names else 1
             for c in ("month_of_birth", "day_of_birth")]
    births = _keys(person["year_of_birth"], *parts)  # the earliest possible birth date
    yield from rows_finding(view, "birth_in_future", "warning", "person", "year_of_birth",
                            pc.greater(births, today.year * 10_000 + today.month * 100 + today.day),
                            f"were born after today ({today})",
                            "correct the birth dates (an export whose dates were shifted, as "
                            "MIMIC-IV's, has them by design and can be used).")
    born = pa.table({"person_id": person["person_id"], "_birth": births})
    yield from _events_before_birth(view, born)
    deaths = view.column("death", "death_date") if view.has("death") else None
    if deaths is None:
        return
    rows = numbered(person_id=view.table("death")["person_id"],
                    _death=_keys(pc.year(deaths), pc.month(deaths), pc.day(deaths)))
    joined = rows.join(born, "person_id", join_type="left outer")
    yield from rows_finding(view, "death_before_birth", "warning", "death", "death_date",
                            any_by_row(joined, pc.less(joined["_death"], joined["_birth"])),
                            "date a death before the person's earliest possible birth date",
                            "correct the death or birth date in the source.")


def _events_before_birth(view: LakeView, born: pa.Table) -> Iterator[Finding]:
    """Events (and observation periods) dated before their person's earliest possible birth date
    (OHDSI DQD's plausibleAfterBirth). The cohort rules cope: an index date before birth is a
    negative age, which fails the age step of the attrition."""
    dated = {**EVENT_DATES, "observation_period": "observation_period_start_date"}
    for name, date in dated.items():
        if not view.has(name) or view.column(name, date) is None or "person_id" not in view.table(name).column_names:
            continue
        dates = view.table(name)[date]
        rows = numbered(person_id=view.table(name)["person_id"],
                        _date=_keys(pc.year(dates), pc.month(dates), pc.day(dates)))
        joined = rows.join(born, "person_id", join_type="left outer")
        yield from rows_finding(view, "event_before_birth", "warning", name, date,
                                any_by_row(joined, pc.less(joined["_date"], joined["_birth"])),
                                "are dated before their person's earliest possible birth date (a "
                                "person indexed then has a negative age and fails the age step)",
                                "correct the event's or the person's birth date in the source.")
