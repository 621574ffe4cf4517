"""results.json: the study's one machine-readable output."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from coordinator.plan import StudyPlan
from shared.errors import ConvergenceError
from shared.protocol.model import StudyProtocol

RESULTS_SCHEMA_VERSION = 1
_PACKAGES = ("fedrwe", "flwr", "prefect", "pyspark", "deltalake", "numpy", "scipy", "pandas", "pydantic")


def software_versions(packages: Sequence[str] = _PACKAGES) -> dict[str, str]:
    """Versions of Python and ``packages`` (default: those that shaped the study's numbers),
    read from their metadata without importing them."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def comparison_results(plan: StudyPlan, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The results of one comparison: its sites' counts and attrition, estimates, rounds."""
    return {
        "sites": [plan.sites[site_id] for site_id in sorted(plan.sites)],
        "analyses": plan.analyses(),
        **({"propensity": propensity} if (propensity := plan.propensity()) is not None else {}),
        **plan.extras(),
        **({"secure_aggregation": {
            "masked_tasks": ["propensity", "crude_cox"], "sites": sorted(plan.peer_keys),
            "note": "model rounds reached the coordinator only as sums over these sites (docs/privacy.md)",
        }} if plan.secure else {}),
        "rounds": rounds,
    }


def build_results(
    plan: StudyPlan, rounds: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """results.json of a study run by one plan (one comparison)."""
    return study_results(plan.study, plan.run_id, [(plan.comparison, comparison_results(plan, rounds))], extra)


def study_results(
    study: StudyProtocol,
    run_id: str,
    comparisons: list[tuple[str | None, dict[str, Any]]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble results.json from each comparison's results (or ``{"error": ...}``).

    A one-comparison protocol keeps its results at the top level; a protocol with several
    lists them under ``comparisons`` (each with its id and title), in protocol order.
    """
    header = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "study_id": study.study_id,
        "title": study.title,
        "protocol_sha256": study.sha256(),
        "run_id": run_id,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if comparisons == [(None, comparisons[0][1])]:
        body: dict[str, Any] = comparisons[0][1]
    else:
        body = {"comparisons": [
            {"comparison_id": cid, "title": study.resolve(cid).title, **result} for cid, result in comparisons
        ]}
    return {**header, **body, "software": software_versions(), **(extra or {})}


# What differs between two runs of the same protocol on the same data: ids, clocks and
# durations. Everything else in results.json is byte-identical across reruns and resumes.
VOLATILE_TOP_LEVEL = ("run_id", "generated_at", "orchestration")
# bytes: a signed envelope carries its signing time (epoch seconds to the millisecond,
# written as the shortest decimal), so a message's size can differ by a few bytes
VOLATILE_ROUND_FIELDS = ("seconds", "bytes_sent", "bytes_received", "bytes_by_site")
VOLATILE_PROVENANCE_FIELDS = ("cohort_seconds",)


def stable_view(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without its volatile fields (the run's ids, times, durations and the
    signed messages' sizes).

    Two runs (or a run and its resume) of the same protocol on the same data have equal
    stable views, byte for byte as JSON: tests/test_reliability.py holds that.
    """
    view = json.loads(json.dumps(results))
    for key in VOLATILE_TOP_LEVEL:
        view.pop(key, None)
    for comparison in view.get("comparisons", [view]):
        for record in comparison.get("rounds", []):
            for key in VOLATILE_ROUND_FIELDS:
                record.pop(key, None)
        for site in comparison.get("sites", []):
            for key in VOLATILE_PROVENANCE_FIELDS:
                site.get("provenance", {}).pop(key, None)
    return dict(view)


def stable_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two results differ outside their volatile fields: JSON paths with both values."""
    found: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if key not in x or key not in y:
                    found.append(f"{path}.{key}: only in {'the second' if key in y else 'the first'}")
                else:
                    walk(x[key], y[key], f"{path}.{key}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{path}[{i}]")
        elif x != y:
            found.append(f"{path}: {json.dumps(x)[:80]} != {json.dumps(y)[:80]}")

    walk(stable_view(a), stable_view(b), "results")
    return found


def comparison_views(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each comparison's results merged with the study's header, as one-comparison results
    read (``comparison_id`` None for a one-comparison study)."""
    if "comparisons" not in results:
        return [{"comparison_id": None, **results}]
    header = {key: value for key, value in results.items() if key != "comparisons"}
    return [{**header, **comparison} for comparison in results["comparisons"]]


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
