"""Which round tasks travel as masked sums, and how their values become one vector and back.

Both sides use this module: a site masks a task's released values (:func:`mask_task`),
the coordinator turns the sites' masked vectors into the summed values
(:func:`unmask_task`), shaped like one site's plain reply, so a fit can absorb the sum as
if one site had sent it. Only the fields listed in ``MASKED_FIELDS`` leave a site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.errors import SecureAggregationError
from shared.privacy.secure_sum import (
    CHECK_ENTRIES,
    MaskContext,
    masked_vector,
    pack,
    unmasked_sum,
    unpack,
)

KEY_TASK = "secure_aggregation_keys"
"""The summary round's task that releases a site's public key for the run."""

MASKED_FIELDS: dict[str, tuple[str, ...]] = {
    "propensity": ("loglik", "gradient", "hessian", "n"),
    "crude_cox": ("loglik", "gradient", "hessian", "third"),
}
"""Per masked task, the fields whose sum over sites the coordinator needs (all additive)."""

Layout = list[tuple[str, list[int]]]


def flatten(values: Mapping[str, Any], fields: tuple[str, ...]) -> tuple[list[float], Layout]:
    """The fields' numbers in order, and each field's shape (to rebuild them)."""
    flat: list[float] = []
    layout: Layout = []
    for name in fields:
        array = np.asarray(values[name], dtype=np.float64)
        layout.append((name, list(array.shape)))
        flat.extend(array.ravel().tolist())
    return flat, layout


def unflatten(flat: list[float], layout: Layout) -> dict[str, Any]:
    """The fields back from :func:`flatten`'s numbers and layout (scalars as floats)."""
    values: dict[str, Any] = {}
    start = 0
    for name, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        chunk = flat[start : start + size]
        values[name] = np.asarray(chunk).reshape(shape).tolist() if shape else chunk[0]
        start += size
    return values


def mask_task(
    task: str, values: Mapping[str, Any], own_id: str, private_key: X25519PrivateKey,
    peers: Mapping[str, str], context: MaskContext,
) -> dict[str, Any]:
    """A task's released values as one masked vector (``masked``) and its ``layout``."""
    flat, layout = flatten(values, MASKED_FIELDS[task])
    vector = masked_vector(flat, own_id, private_key, peers, context)
    return {"masked": pack(vector), "layout": [[name, shape] for name, shape in layout]}


def _layout(site_id: str, part: Mapping[str, Any], task: str) -> Layout:
    try:
        return [(str(name), [int(n) for n in shape]) for name, shape in part["layout"]]
    except (KeyError, TypeError, ValueError):
        raise SecureAggregationError(
            f"site {site_id!r} sent {task!r} without a masked vector's layout, though the study "
            f"uses secure aggregation. Fix: run the same fedrwe version at every site."
        ) from None


def unmask_task(task: str, parts: Mapping[str, Mapping[str, Any]], context: MaskContext) -> dict[str, Any]:
    """The sum over sites of a task's fields, from every site's masked part (site id -> part)."""
    layouts = {site_id: _layout(site_id, part, task) for site_id, part in parts.items()}
    first = next(iter(layouts.values()))
    different = sorted(site_id for site_id, layout in layouts.items() if layout != first)
    if different or [name for name, _ in first] != list(MASKED_FIELDS[task]):
        raise SecureAggregationError(
            f"the masked {task!r} vectors of round {context.round_name!r} do not share one layout "
            f"(sites {different or sorted(parts)} differ). Fix: run the same protocol and fedrwe version everywhere."
        )
    length = sum(int(np.prod(shape)) if shape else 1 for _, shape in first) + CHECK_ENTRIES
    vectors = [unpack(str(part.get("masked", "")), length, site_id) for site_id, part in sorted(parts.items())]
    return unflatten(unmasked_sum(vectors, context), first)
