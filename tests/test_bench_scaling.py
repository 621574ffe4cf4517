"""bench/scaling.py without running a study: the fits, the points, the tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.common import format_table
from bench.scaling import (
    FULL,
    HEADERS,
    QUICK,
    Point,
    build_tables,
    fit_line,
    fit_power,
    n_driver_memory,
    point_figures,
    row,
    series_fits,
    series_points,
)

EXACT = 1e-10  # the fits of noiseless data are exact up to rounding


def test_power_fit_recovers_the_exponent() -> None:
    n = [10_000, 100_000, 1_000_000]
    fit = fit_power(n, [3.0 * x**0.8 for x in n])
    assert fit is not None
    assert fit.slope == pytest.approx(0.8, abs=EXACT)
    assert fit.intercept == pytest.approx(math.log(3.0), abs=EXACT)
    assert fit.r_squared == pytest.approx(1.0, abs=EXACT)
    assert fit.points == 3


def test_line_fit_gives_seconds_per_site() -> None:
    fit = fit_line([2, 5, 10], [100.0 + 12.0 * k for k in (2, 5, 10)])
    assert fit is not None
    assert fit.slope == pytest.approx(12.0, abs=EXACT)
    assert fit.intercept == pytest.approx(100.0, abs=EXACT)


def test_line_fit_of_noisy_data_is_least_squares() -> None:
    # y = 1, 3, 2 at x = 0, 1, 2: slope 0.5, intercept 1.5, R squared 0.25 (by hand)
    fit = fit_line([0, 1, 2], [1.0, 3.0, 2.0])
    assert fit is not None
    assert (fit.slope, fit.intercept) == pytest.approx((0.5, 1.5), abs=EXACT)
    assert fit.r_squared == pytest.approx(0.25, abs=EXACT)


def test_no_fit_below_two_points() -> None:
    assert fit_line([5], [1.0]) is None
    assert fit_line([5, 5], [1.0, 2.0]) is None


def test_series_points_share_the_point_both_series_have() -> None:
    points = series_points(QUICK, "both")
    assert [p.per_site for p in points["n"]] == list(QUICK.per_site)
    assert [p.sites for p in points["sites"]] == list(QUICK.sites_list)
    assert points["n"][0] == points["sites"][0]  # 2 sites x 5k at 512m: run once
    assert set(series_points(FULL, "n")) == {"n"}
    assert [p.driver_memory for p in series_points(FULL, "n")["n"]] == ["512m", "1g", "4g"]
    assert n_driver_memory(20_000) == "512m"
    assert n_driver_memory(20_001) == "1g"


def fake_outputs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    timings = {
        "generate_data_s": 4.5, "start_network_s": 40.0, "study_run_s": 120.0, "total_s": 170.0,
        "cohort_s": {"site_01": 30.0, "site_02": 21.5},
        "rounds_s": {"cohort": 60.0, "propensity_newton_1": 10.0, "cox_newton_1": 5.5},
        "peak_rss_bytes": {"total": 6 * 2**30, "per_process": {
            "prefect-server": 2**28, "superlink": 2**29,
            "site_01-service": 2**31, "site_02-service": 3 * 2**30,
            "site_01-supernode": 2**28, "site_02-supernode": 2**28}},
    }
    results = {"sites": [{"site_id": "site_01"}, {"site_id": "site_02"}], "rounds": [
        {"name": "cohort", "seconds": 60.0, "bytes_sent": 2048, "bytes_received": 10_240},
        {"name": "propensity_newton_1", "seconds": 10.0, "bytes_sent": 1024, "bytes_received": 1024},
        {"name": "cox_newton_1", "seconds": 5.5, "bytes_sent": 1024, "bytes_received": 2048},
    ]}
    site = {"n_background": 2_500, "n_antidepressant": 1_200}
    truth = {"sites": {"site_01": {"n_cud": 12_500, **site}, "site_02": {"n_cud": 7_500, **site}}}
    return timings, results, truth


def test_point_figures_from_fake_outputs() -> None:
    figures = point_figures(*fake_outputs())
    assert figures["cud_mean"] == 10_000
    assert figures["cud_largest"] == 12_500
    assert figures["persons"] == 20_000 + 2 * 3_700
    assert figures["cohort_s"] == 30.0  # the slowest site
    assert figures["rounds_s"] == 75.5
    assert figures["rounds"] == 3
    assert (figures["round_1_s"], figures["later_rounds_s"]) == (60.0, 15.5)
    assert figures["sites_analysed"] == 2
    assert figures["dropped"] == []
    assert (figures["bytes_sent"], figures["bytes_received"]) == (4096, 13_312)
    assert figures["peak_rss"]["total_mib"] == 6 * 1024
    assert figures["peak_rss"]["per_kind"]["service"] == {"processes": 2, "max_mib": 3072, "sum_mib": 5120}


def test_tables_keep_a_failed_point_and_fit_the_others() -> None:
    ok = {"sites": 2, "per_site": 10_000, "patients": 20_000, "driver_memory": "512m", "wall_s": 180.0,
          **point_figures(*fake_outputs())}
    bigger = ok | {"per_site": 100_000, "patients": 200_000, "study_s": 600.0, "cohort_s": 300.0}
    failed = {"sites": 2, "per_site": 1_000_000, "patients": 2_000_000, "driver_memory": "4g", "wall_s": 900.0,
              "error": "SiteUnavailable: site_01 stopped (exit 137: out of memory)"}
    records = [ok, bigger, failed]
    cells = row(ok)
    assert len(cells) == len(HEADERS)
    assert dict(zip(HEADERS, cells, strict=True))["sent KiB"] == 4
    assert row(failed)[-1].startswith("SiteUnavailable")
    assert row(failed)[HEADERS.index("study s")] is None
    fits = {"n": series_fits("n", records)}
    assert fits["n"]["study_s"] is not None
    assert fits["n"]["study_s"].points == 2
    assert fits["n"]["study_s"].slope == pytest.approx(math.log10(600.0 / 120.0), abs=EXACT)
    tables = build_tables(FULL, {"n": records}, fits)
    assert [t["title"] for t in tables] == ["Time against patients per site", "Fitted slopes (least squares over the points that ran)"]
    assert "exit 137" in format_table(tables[0])
    assert Point(2, 10_000, "512m").patients == 20_000


def test_a_simulation_may_give_its_processes_longer_to_start(tmp_path: Path) -> None:
    """A loaded machine's JVMs can miss the default 90 s; the setting is checked, not patched in."""
    from pydantic import ValidationError

    from flows.simulate import SimulationSettings

    assert SimulationSettings(out=tmp_path).start_timeout_s is None  # the rule start_timeout_s(sites)
    assert SimulationSettings(out=tmp_path, start_timeout_s=300).start_timeout_s == 300
    with pytest.raises(ValidationError, match="start_timeout_s"):
        SimulationSettings(out=tmp_path, start_timeout_s=0)
