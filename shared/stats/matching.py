"""Deterministic 1:1 greedy nearest-neighbour matching on the logit of the propensity score.

Run within each site (no score leaves it). Treated persons are taken in descending score
order, ties by ascending person id; each takes the available control nearest in logit,
ties by ascending person id, if it lies within the caliper; matching is without
replacement. The same data give the same pairs on every run (TriNetX shuffles first).

The search keeps the controls sorted by logit and two "next available" pointers with
path compression, so a match costs near-constant time instead of a scan.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


class _Available:
    """Nearest not-yet-used position to the left or right of an index (union-find)."""

    def __init__(self, n: int) -> None:
        self._left = np.arange(n + 1)  # slot i + 1 stands for position i; slot 0 means "none"
        self._right = np.arange(n + 1)  # slot n means "none"

    def left(self, i: int) -> int:
        """Largest available position <= i, or -1."""
        root = i + 1
        while self._left[root] != root:
            self._left[root] = self._left[self._left[root]]
            root = self._left[root]
        return int(root) - 1

    def right(self, i: int) -> int:
        """Smallest available position >= i, or n."""
        root = i
        while self._right[root] != root:
            self._right[root] = self._right[self._right[root]]
            root = self._right[root]
        return int(root)

    def take(self, i: int) -> None:
        self._left[i + 1] = i
        self._right[i] = i + 1


def greedy_match(
    treated_id: NDArray[np.int64],
    treated_logit: NDArray[np.float64],
    control_id: NDArray[np.int64],
    control_logit: NDArray[np.float64],
    caliper: float,
) -> list[tuple[int, int]]:
    """Pairs ``(treated person id, control person id)`` of one site, in matching order."""
    order = np.lexsort((control_id, control_logit))  # by logit, ties by person id
    logits, ids = control_logit[order], control_id[order]
    available = _Available(len(ids))
    pairs: list[tuple[int, int]] = []
    for t in np.lexsort((treated_id, -treated_logit)):  # descending score, ties by id
        x = float(treated_logit[t])
        above = int(np.searchsorted(logits, x, side="left"))
        left = available.left(above - 1)
        while left >= 0 and (previous := available.left(left - 1)) >= 0 and logits[previous] == logits[left]:
            left = previous  # the smallest id among available controls at that logit
        right = available.right(above)  # already the smallest id at its logit
        candidates = [
            (abs(float(logits[p]) - x), int(ids[p]), p) for p in (left, right) if 0 <= p < len(ids)
        ]
        if not candidates:
            break  # no control left at this site
        distance, control, position = min(candidates)
        if distance > caliper:
            continue
        available.take(position)
        pairs.append((int(treated_id[t]), control))
    return pairs


def caliper_width(logit_sum: float, logit_sum_squares: float, n: int, ratio: float = 0.1) -> float:
    """``ratio`` x the SD of the logit over everyone (from moments summed over sites)."""
    mean = logit_sum / n
    variance = max(logit_sum_squares / n - mean * mean, 0.0) * n / (n - 1)
    return ratio * float(np.sqrt(variance))


def greedy_match_sets(
    treated_id: NDArray[np.int64],
    treated_logit: NDArray[np.float64],
    control_id: NDArray[np.int64],
    control_logit: NDArray[np.float64],
    caliper: float,
    ratio: int = 1,
) -> dict[int, list[int]]:
    """Matched sets ``{treated person id: [control ids]}`` with up to ``ratio`` controls each.

    Matching runs in ``ratio`` passes (as CohortMethod's greedy matching does): each pass
    gives every treated person still in the running one more control, by the rules of
    :func:`greedy_match`, from the controls nobody has taken yet. A treated person without
    a control in the first pass is left out.
    """
    sets: dict[int, list[int]] = {}
    treated = np.ones(len(treated_id), dtype=bool)
    free = np.ones(len(control_id), dtype=bool)
    position = {int(c): i for i, c in enumerate(control_id)}
    for _ in range(ratio):
        pairs = greedy_match(
            treated_id[treated], treated_logit[treated], control_id[free], control_logit[free], caliper
        )
        if not pairs:
            break
        for person, control in pairs:
            sets.setdefault(person, []).append(control)
            free[position[control]] = False
        matched = {person for person, _ in pairs}
        treated &= np.isin(treated_id, list(matched))
    return sets
