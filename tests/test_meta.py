"""Meta-analysis of per-site estimates against statsmodels.

Reference: ``statsmodels.stats.meta_analysis.combine_effects(effect, variance,
method_re="dl")`` (statsmodels checks it against R metafor ``rma(method="DL")``), and for
the pooled z and p-value a weighted least-squares fit with the scale fixed at 1
(``sm.WLS(...).fit(cov_type="fixed scale", use_t=False)``), which is the same model.
statsmodels does not truncate the DerSimonian-Laird tau^2 at 0 (nor I^2), so when Q <= df
the truncated random-effects result is compared with its fixed-effect row.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from numpy.typing import NDArray
from statsmodels.stats.meta_analysis import combine_effects

from shared.errors import DataError
from shared.stats.meta import MetaAnalysis, PooledEstimate, meta_analysis

RELATIVE = 1e-10  # both sides are closed-form double-precision arithmetic

# Log hazard ratios and SEs for k = 1, 2, 3 and 7 sites; each k > 1 has Q > df (tau^2 > 0).
# The last of the 7 sites is tiny (SE 2.5): its weight must be near 0, not its estimate.
SITES = {
    1: ([0.31], [0.12]),
    2: ([0.25, 0.60], [0.10, 0.15]),
    3: ([-0.10, -0.50, 0.20], [0.10, 0.20, 0.15]),  # pooled < 0: p from |z|
    7: ([0.21, 0.35, 0.05, 0.48, 0.30, 0.12, 1.40], [0.08, 0.11, 0.09, 0.20, 0.14, 0.10, 2.50]),
}


def close(actual: object, expected: object) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
        rtol=RELATIVE, atol=0.0,
    )


def statsmodels_fit(
    y: NDArray[np.float64], variance: NDArray[np.float64], level: float
) -> tuple[Any, pd.DataFrame]:
    """combine_effects' results and summary frame (k = 1 makes its RE part 0/0: ignored)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        result = combine_effects(y, variance, method_re="dl")
        frame = result.summary_frame(alpha=1.0 - level)
    return result, frame


def wls_wald(y: NDArray[np.float64], variance: NDArray[np.float64]) -> tuple[float, float]:
    """z and two-sided p of the inverse-variance mean, from statsmodels' WLS at scale 1."""
    fit = sm.WLS(y, np.ones(len(y)), weights=1.0 / variance).fit(
        cov_type="fixed scale", use_t=False
    )
    return float(fit.tvalues[0]), float(fit.pvalues[0])


def check_pooled(
    ours: PooledEstimate, row: pd.Series, y: NDArray[np.float64], variance: NDArray[np.float64]
) -> None:
    close(
        [ours.estimate, ours.se, ours.ci_low, ours.ci_high],
        [row["eff"], row["sd_eff"], row["ci_low"], row["ci_upp"]],
    )
    close([ours.z, ours.p_value], wls_wald(y, variance))


@pytest.mark.parametrize("level", [0.95, 0.90])
@pytest.mark.parametrize("k", sorted(SITES))
def test_matches_statsmodels_combine_effects(k: int, level: float) -> None:
    y, se = (np.array(v) for v in SITES[k])
    variance = se**2
    ours = meta_analysis(y, se, level=level)
    reference, frame = statsmodels_fit(y, variance, level)

    assert (ours.k, ours.q_df, ours.level) == (k, k - 1, level)
    check_pooled(ours.fixed, frame.loc["fixed effect"], y, variance)
    close(ours.weights_fixed, frame["w_fe"].iloc[:k])
    if k == 1:  # one site: no heterogeneity to estimate; random effects is that site
        assert (ours.q, ours.q_p_value) == (0.0, None)
        assert (ours.tau_squared, ours.i_squared) == (0.0, 0.0)
        assert ours.random == ours.fixed
        close([ours.fixed.estimate, ours.fixed.se], [y[0], se[0]])
        return
    assert reference.tau2 > 0  # the data do exercise tau^2 > 0
    close(ours.q, reference.q)
    close(ours.q_p_value, reference.test_homogeneity().pvalue)
    close([ours.tau_squared, ours.i_squared], [reference.tau2, reference.i2])
    check_pooled(ours.random, frame.loc["random effect"], y, variance + reference.tau2)
    close(ours.weights_random, frame["w_re"].iloc[:k])


def test_tiny_site_gets_almost_no_weight() -> None:
    ours = meta_analysis(*SITES[7])
    assert ours.weights_fixed[-1] < 1e-3
    assert ours.weights_random[-1] < 1e-3
    close([sum(ours.weights_fixed), sum(ours.weights_random)], [1.0, 1.0])


def test_q_below_df_truncates_tau_squared_and_i_squared_at_zero() -> None:
    y, se = np.array([0.12, 0.24, 0.17]), np.array([0.10, 0.12, 0.11])
    reference, frame = statsmodels_fit(y, se**2, 0.95)
    assert reference.q < 2  # Q < df = 2: statsmodels leaves tau^2 and I^2 negative there
    assert reference.tau2 < 0
    assert reference.i2 < 0
    ours = meta_analysis(y, se)
    assert (ours.tau_squared, ours.i_squared) == (0.0, 0.0)
    close(ours.q, reference.q)
    check_pooled(ours.random, frame.loc["fixed effect"], y, se**2)
    close(ours.weights_random, frame["w_fe"].iloc[:3])


def test_identical_estimates_have_no_heterogeneity() -> None:
    ours = meta_analysis([0.4, 0.4, 0.4, 0.4], [0.1, 0.3, 0.2, 1.5])
    assert (ours.tau_squared, ours.i_squared) == (0.0, 0.0)
    assert ours.q < 1e-20
    close(ours.fixed.estimate, 0.4)
    assert ours.random == ours.fixed
    close(ours.q_p_value, 1.0)


def plain(value: object) -> bool:
    """Only JSON's own types (no numpy scalars), recursively."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(plain(item) for item in value)
    return value is None or type(value) in (int, float)


@pytest.mark.parametrize("k", sorted(SITES))
def test_to_json_is_plain_and_finite(k: int) -> None:
    ours = meta_analysis(*SITES[k])
    data = ours.to_json()
    assert plain(data)
    text = json.dumps(data, allow_nan=False)  # raises on NaN or infinity
    assert json.loads(text) == data
    assert data["q_p_value"] is None if k == 1 else isinstance(data["q_p_value"], float)
    assert data["random"] == ours.random.to_json()


def test_single_site_json() -> None:
    data = meta_analysis([-0.7], [0.35]).to_json()
    json.dumps(data, allow_nan=False)
    assert (data["k"], data["q_df"], data["q_p_value"]) == (1, 0, None)
    assert (data["i_squared"], data["tau_squared"]) == (0.0, 0.0)
    assert data["weights_fixed"] == data["weights_random"] == [1.0]
    assert data["fixed"] == data["random"]
    assert data["fixed"]["estimate"] == -0.7  # type: ignore[index]


@pytest.mark.parametrize(
    ("estimates", "standard_errors", "message"),
    [
        ([0.1, 0.2], [0.1, 0.0], r"site index 1 has standard error 0\.0.*> 0"),
        ([0.1, 0.2], [-0.2, 0.1], r"site index 0 has standard error -0\.2"),
        ([0.1, 0.2], [0.1, math.inf], r"site index 1 has standard error inf"),
        ([0.1, 0.2], [0.1, math.nan], r"site index 1 has standard error nan"),
        ([0.1, 1e-200], [0.1, 1e-200], r"site index 1 has standard error 1e-200"),
        ([math.nan, 0.2], [0.1, 0.1], r"site index 0 has estimate nan.*Fix"),
        ([0.1, 0.2, 0.3], [0.1, 0.1], r"3 estimates and 2 standard errors.*Fix"),
        ([], [], r"no sites.*Fix"),
        ([[0.1, 0.2]], [[0.1, 0.1]], r"shapes \(1, 2\)"),
    ],
)
def test_bad_input_names_the_value(
    estimates: list[float], standard_errors: list[float], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        meta_analysis(estimates, standard_errors)


def test_bad_input_names_the_site_when_given() -> None:
    with pytest.raises(DataError, match=r"site 'hospital-b' \(index 1\) has standard error 0\.0"):
        meta_analysis([0.1, 0.2], [0.1, 0.0], sites=["hospital-a", "hospital-b"])
    with pytest.raises(DataError, match=r"2 estimates and 2 standard errors for 3 sites"):
        meta_analysis([0.1, 0.2], [0.1, 0.1], sites=["a", "b", "c"])


@pytest.mark.parametrize("level", [95.0, 0.0, 1.0, math.nan])
def test_bad_level_is_refused(level: float) -> None:
    with pytest.raises(DataError, match=rf"level is {level!r}.*e\.g\. 0\.95"):
        meta_analysis([0.1, 0.2], [0.1, 0.1], level=level)


def test_result_cannot_hold_nan() -> None:
    fixed = meta_analysis([0.1], [0.1]).fixed
    with pytest.raises(DataError, match="tau_squared is nan"):
        MetaAnalysis(fixed, fixed, 0.0, 0, None, 0.0, math.nan, 1, (1.0,), (1.0,), 0.95)
