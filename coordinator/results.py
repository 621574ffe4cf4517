"""results.json: the study's one machine-readable output."""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from coordinator.plan import StudyPlan
from shared.errors import ConvergenceError

RESULTS_SCHEMA_VERSION = 1
_PACKAGES = ("fedrwe", "flwr", "prefect", "pyspark", "deltalake", "numpy", "scipy", "pandas", "pydantic")


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages that shaped the numbers (no imports needed)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_results(
    plan: StudyPlan, rounds: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Assemble results.json from a finished plan and the transport's round records."""
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "study_id": plan.protocol.study_id,
        "title": plan.protocol.title,
        "protocol_sha256": plan.protocol.sha256(),
        "run_id": plan.run_id,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sites": [plan.sites[site_id] for site_id in sorted(plan.sites)],
        "analyses": plan.analyses(),
        **({"propensity": propensity} if (propensity := plan.propensity()) is not None else {}),
        **plan.extras(),
        "rounds": rounds,
        "software": software_versions(),
        **(extra or {}),
    }


def _finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConvergenceError(
            f"results.json would hold {value} at {where}; refusing to write it. Fix: check that "
            f"analysis's counts (an arm without events has no finite estimate)."
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _finite(item, f"{where}[{i}]")


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write results.json atomically; never with NaN or infinity."""
    _finite(results, "results")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    partial.replace(path)
