"""A site's own settings, read once from its TOML file at start-up and passed down.

The disclosure policy lives here: thresholds come from the site, never from a request.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import SettingsError


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkSettings(_Settings):
    """How the site's one SparkSession is created."""

    master: str = Field(default="local[*]", description="Spark master URL (local[*], spark://, yarn, k8s://).")
    driver_memory: str = Field(default="2g", pattern=r"^\d+[kmgt]$", description="spark.driver.memory.")
    shuffle_partitions: int = Field(default=8, ge=1, le=10_000, description="spark.sql.shuffle.partitions.")


TimeGrid = Literal["day", "week", "month"]
GRID_DAYS: dict[str, int] = {"day": 1, "week": 7, "month": 30}
PolicyAnalysis = Literal["crude", "propensity", "matched", "iptw_ate", "iptw_att", "overlap", "large_scale"]
ALL_ANALYSES: tuple[PolicyAnalysis, ...] = ("crude", "propensity", "matched", "iptw_ate", "iptw_att", "overlap", "large_scale")


class NoiseSettings(_Settings):
    """Laplace noise on released counts (scale 1 / epsilon: one person changes a count by 1)."""

    epsilon: float = Field(gt=0.0, le=100.0, description="Privacy parameter per released count; smaller is noisier.")


class DisclosurePolicy(_Settings):
    """What may leave the site. Owned by the site's data steward."""

    min_cell_count: int = Field(
        default=10, ge=1, le=1000,
        description="Smallest non-zero count of persons or events that may be released.",
    )
    event_tables: bool = Field(
        default=True,
        description=(
            "Whether per-day event tables (events and exits per follow-up day) may leave the site. "
            "Without them: no Kaplan-Meier curves or risks, and weighted Cox fits take extra rounds."
        ),
    )
    max_abs_coefficient: float = Field(
        default=20.0, gt=0, le=100,
        description=(
            "Largest |coefficient| at which the site evaluates a model; extreme values turn "
            "gradients into plain counts."
        ),
    )
    below_minimum: Literal["refuse", "suppress"] = Field(
        default="refuse",
        description=(
            "What a count below min_cell_count does: `refuse` the whole reply, or `suppress` the "
            "task (or part) it belongs to, which is sent as a marker naming the count (never its value)."
        ),
    )
    time_grid: TimeGrid = Field(
        default="day",
        description=(
            "Grid of the event tables and matched risk-set tables that leave the site: follow-up "
            "times are rounded up to the end of their day, week (7 days) or month (30 days)."
        ),
    )
    allowed_analyses: list[PolicyAnalysis] = Field(
        default_factory=lambda: list(ALL_ANALYSES), min_length=1,
        description="Analyses the site runs (crude, propensity, matched, iptw_ate, iptw_att, overlap, large_scale).",
    )
    max_rounds_per_study: int = Field(
        default=100, ge=1, le=100_000,
        description="Most distinct requests the site answers for one study comparison, over all its runs.",
    )
    max_studies_per_period: int = Field(
        default=50, ge=1, le=100_000,
        description="Most distinct study comparisons the site starts within `period_days`.",
    )
    period_days: int = Field(default=30, ge=1, le=3650, description="The period of `max_studies_per_period`, in days.")
    min_cohort_size: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Smallest cohort (persons) the site computes anything on; default: min_cell_count.",
    )
    max_parameters_per_patients: float = Field(
        default=1.0, ge=0.0, le=1000.0,
        description=(
            "A model with p parameters needs at least p x this many persons at the site; "
            "otherwise its gradient and Hessian say too much about each person."
        ),
    )
    dp_noise: NoiseSettings | None = Field(
        default=None,
        description="Opt-in Laplace noise on released counts; estimates that use them are then labelled approximate.",
    )

    def cohort_minimum(self) -> int:
        """The smallest cohort the site computes on (``min_cohort_size``, else ``min_cell_count``)."""
        return self.min_cohort_size if self.min_cohort_size is not None else self.min_cell_count

    def grid_days(self) -> int:
        """Width of the time grid in days."""
        return GRID_DAYS[self.time_grid]


    require_secure_aggregation: bool = Field(
        default=False,
        description=(
            "Refuse model rounds (propensity and crude Cox derivatives) that are not masked sums: "
            "only studies with secure_aggregation: true can fit models with this site."
        ),
    )


class ApprovalSettings(_Settings):
    """Who lets a study run at this site."""

    mode: Literal["steward", "auto"] = Field(
        default="steward",
        description=(
            "'steward': a study runs only after the site's data steward approved its protocol's "
            "SHA-256 (`fedrwe site approve`). 'auto': every protocol is approved automatically - "
            "for simulations only; every reply then says so."
        ),
    )


class SecureAggregationSettings(_Settings):
    """Who this site masks with: its own identity key and the network's sites (its roster)."""

    identity_key: Path | None = Field(
        default=None,
        description=(
            "PEM file (PKCS8, unencrypted) of this site's Ed25519 identity key, which signs its "
            "secure-aggregation key of every run so that peers can check it came from this site."
        ),
    )
    peers: dict[str, str] | None = Field(
        default=None,
        description=(
            "The network's sites (site id -> base64 raw Ed25519 identity public key), from their "
            "stewards. When set, a masked round naming a site not listed, or whose run key is not "
            "signed by it, is refused (a coordinator cannot swap keys). Unset: keys are not checked."
        ),
    )


class EnvelopeSettings(_Settings):
    """The site's keys: requests must be signed by a coordinator key it trusts; replies are signed."""

    coordinator_keyring: Path = Field(
        description="Keyring (JSON) of the coordinator public keys whose requests this site accepts.",
    )
    site_key: Path = Field(description="This site's Ed25519 private key (PEM), which signs its replies.")
    max_lifetime_s: float = Field(
        default=24 * 3600.0, gt=0, le=7 * 24 * 3600.0,
        description="Longest validity (expires_at - issued_at) of a request this site accepts.",
    )
    clock_skew_s: float = Field(
        default=300.0, ge=0, le=3600.0,
        description="How far the coordinator's clock may run ahead of the site's.",
    )
    reply_lifetime_s: float = Field(
        default=3600.0, gt=0, le=24 * 3600.0, description="Validity of the site's signed replies.",
    )


class SiteSettings(_Settings):
    """Everything one site agent needs to run."""

    site_id: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="The site's id in the network.")
    lake: Path = Field(description="Folder holding the site's OMOP CDM Delta tables, one folder per table.")
    workdir: Path = Field(description="Folder for the site's analysis datasets and audit log.")
    host: Literal["127.0.0.1", "localhost", "::1"] = Field(
        default="127.0.0.1",
        description=(
            "Address the site service binds to: loopback only, since requests reach it through "
            "the site's own SuperNode and the service has no authentication of its own."
        ),
    )
    port: int = Field(default=8801, ge=1, le=65_535, description="Port of the site service.")
    spark: SparkSettings = SparkSettings()
    policy: DisclosurePolicy = DisclosurePolicy()
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()
    approval: ApprovalSettings = ApprovalSettings()
    envelopes: EnvelopeSettings | None = Field(
        default=None,
        description=(
            "The site's keys. The site service refuses to start without them; only in-process "
            "tests drive a SiteAgent without envelopes."
        ),
    )


def load_site_settings(path: str | Path) -> SiteSettings:
    """Read a site's TOML settings; errors name the field and the fix."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingsError(f"cannot read site settings {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"site settings {path} are not valid TOML: {error}") from None
    try:
        return SiteSettings.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"`{'.'.join(map(str, e['loc']))}`: {e['msg']}" for e in error.errors()
        )
        raise SettingsError(f"site settings {path} are invalid: {problems}") from None
