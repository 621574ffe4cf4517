"""The coordinator's half of secure aggregation: collect the run's keys, unmask model sums.

The plan never hands a fit one site's model values under secure aggregation: it gets the
sites' masked vectors and passes on only :func:`unmask`'s sum (a single partial shaped
like one site's reply). The sum's self-check (count of sites, checksum) fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import InsufficientSites, SecureAggregationError
from shared.privacy.masked_tasks import KEY_TASK, unmask_task
from shared.privacy.secure_sum import MIN_SITES, MaskContext, load_public_key

__all__ = ["KEY_TASK", "lost_sites_message", "peer_keys", "unmask"]


def peer_keys(study_id: str, site_ids: list[str], summaries: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Every site's announcement from the summary round (site id -> public key, signature), checked."""
    if len(site_ids) < MIN_SITES:
        raise InsufficientSites(
            f"study {study_id!r} uses secure aggregation, which needs at least {MIN_SITES} sites "
            f"(a sum over one site is that site's values), but only {site_ids} answered. Fix: add a "
            f"site or run the study without secure_aggregation."
        )
    keys: dict[str, dict[str, str]] = {}
    for site_id, results in zip(site_ids, summaries, strict=True):
        announced = results.get(KEY_TASK, {})
        key = announced.get("public_key")
        if not isinstance(key, str):
            raise SecureAggregationError(
                f"site {site_id!r} announced no secure-aggregation key in the summary round of study "
                f"{study_id!r}. Fix: run the same fedrwe version at every site."
            )
        load_public_key(key, site_id)
        signature = announced.get("signature")
        keys[site_id] = {"public_key": key, **({"signature": signature} if isinstance(signature, str) else {})}
    if len({announced["public_key"] for announced in keys.values()}) != len(keys):
        raise SecureAggregationError(
            f"two sites of study {study_id!r} announced the same secure-aggregation key, so their "
            f"masks would cancel. Fix: rerun the study (every site makes a fresh key)."
        )
    return keys


def unmask(task: str, run_id: str, round_name: str, site_ids: list[str], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum over sites of ``task``'s values, from the sites' masked parts (in ``site_ids`` order)."""
    return unmask_task(task, dict(zip(site_ids, parts, strict=True)), MaskContext(run_id, round_name, task))


def lost_sites_message(study_id: str, round_name: str, started: Mapping[str, object], replies: Mapping[str, object]) -> str:
    """Why a masked round without every site's reply cannot be used, and what to do."""
    missing = sorted(set(started) - set(replies))
    extra = sorted(set(replies) - set(started))
    return (
        f"study {study_id!r}: round {round_name!r} uses secure aggregation and lacks the masked "
        f"replies of {missing}{f' (and has replies of unknown sites {extra})' if extra else ''}; the "
        f"other sites' masks cannot be removed without them, so no sum of this run can be opened. "
        f"Fix: rerun the study on the sites that remain (a new run, with new keys)."
    )
