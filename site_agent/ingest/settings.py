"""What one ``fedrwe site ingest`` is asked to do, checked once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import SettingsError
from site_agent.settings import load_site_settings


class IngestSettings(BaseModel):
    """One ingest of an OMOP CDM export into a site's Delta tables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    omop: Path = Field(description="Folder of the OMOP CDM 5.3/5.4 export, one file per table.")
    source_format: Literal["csv", "parquet"] = Field(
        default="csv", description="Format of the export's files."
    )
    site_id: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="The site's id in the network.")
    lake: Path = Field(description="Folder of the site's Delta tables, one folder per table.")
    care_site_id: int | None = Field(
        default=None, ge=-(2**63), le=2**63 - 1,
        description="Keep only the persons of this care site (multi-site tests on one export).",
    )


def ingest_settings(
    omop: Path, source_format: Literal["csv", "parquet"], site_id: str | None, lake: Path | None,
    config: Path | None, care_site_id: int | None,
) -> IngestSettings:
    """The settings from the command's options; site id and lake may come from ``config``."""
    site = load_site_settings(config) if config is not None else None
    site_id = site_id or (site.site_id if site else None)
    lake = lake or (site.lake if site else None)
    for option, value in (("--site-id", site_id), ("--lake", lake)):
        if value is None:
            raise SettingsError(
                f"ingest needs {option}. Fix: pass {option}, or --config with the site's "
                f"settings (site.toml), whose `{option[2:].replace('-', '_')}` supplies it."
            )
    try:
        return IngestSettings.model_validate({
            "omop": omop, "source_format": source_format, "site_id": site_id, "lake": lake,
            "care_site_id": care_site_id,
        })
    except ValidationError as error:
        problems = "; ".join(f"`{'.'.join(map(str, e['loc']))}`: {e['msg']}" for e in error.errors())
        raise SettingsError(f"ingest options are invalid: {problems}") from None
