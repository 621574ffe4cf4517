"""Greedy 1:1 caliper matching against a brute-force implementation of the same rules."""

from __future__ import annotations

import numpy as np
import pytest

from shared.stats.matching import caliper_width, greedy_match, greedy_match_sets


def brute_force(t_id: np.ndarray, t_logit: np.ndarray, c_id: np.ndarray, c_logit: np.ndarray, caliper: float) -> list[tuple[int, int]]:
    """The rules read literally: O(n * m), no clever data structure."""
    used: set[int] = set()
    pairs = []
    treated = sorted(zip(t_logit.tolist(), t_id.tolist(), strict=True), key=lambda p: (-p[0], p[1]))
    controls = list(zip(c_logit.tolist(), c_id.tolist(), strict=True))
    for logit, tid in treated:
        best = None
        for c_logit_value, cid in controls:
            if cid in used:
                continue
            key = (abs(c_logit_value - logit), cid)
            if best is None or key < best:
                best = key
        if best is not None and best[0] <= caliper:
            used.add(best[1])
            pairs.append((tid, best[1]))
    return pairs


@pytest.mark.parametrize("seed", range(8))
def test_greedy_matching_equals_the_literal_rules(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_t, n_c = rng.integers(1, 60), rng.integers(1, 120)
    # Coarse logits make ties in score and in distance common.
    t_logit = np.round(rng.normal(0.3, 1.0, n_t), 1)
    c_logit = np.round(rng.normal(0.0, 1.0, n_c), 1)
    t_id = rng.permutation(10_000)[:n_t].astype(np.int64)
    c_id = (10_000 + rng.permutation(10_000)[:n_c]).astype(np.int64)
    caliper = float(rng.choice([0.05, 0.2, 10.0]))
    assert greedy_match(t_id, t_logit, c_id, c_logit, caliper) == brute_force(t_id, t_logit, c_id, c_logit, caliper)


def test_matching_is_deterministic_and_without_replacement() -> None:
    rng = np.random.default_rng(1)
    t_logit, c_logit = rng.normal(0.5, 1, 500), rng.normal(0, 1, 1500)
    t_id, c_id = np.arange(500), np.arange(1000, 2500)
    first = greedy_match(t_id, t_logit, c_id, c_logit, 0.05)
    assert first == greedy_match(t_id[::-1], t_logit[::-1], c_id[::-1], c_logit[::-1], 0.05)
    controls = [c for _, c in first]
    assert len(controls) == len(set(controls))


def test_caliper_is_a_tenth_of_the_sample_sd_of_the_logit() -> None:
    x = np.random.default_rng(2).normal(0, 2, 1000)
    assert caliper_width(float(x.sum()), float((x * x).sum()), len(x)) == pytest.approx(0.1 * x.std(ddof=1), rel=1e-12)


def literal_sets(t_id: np.ndarray, t_logit: np.ndarray, c_id: np.ndarray, c_logit: np.ndarray,
                 caliper: float, ratio: int) -> dict[int, list[int]]:
    """1:ratio matching read literally: ratio passes of the 1:1 rules over the controls left."""
    sets: dict[int, list[int]] = {}
    taken: set[int] = set()
    in_running = set(t_id.tolist())
    for _ in range(ratio):
        keep_t = np.array([t in in_running for t in t_id.tolist()], dtype=bool)
        keep_c = np.array([c not in taken for c in c_id.tolist()], dtype=bool)
        pairs = brute_force(t_id[keep_t], t_logit[keep_t], c_id[keep_c], c_logit[keep_c], caliper)
        for t, c in pairs:
            sets.setdefault(t, []).append(c)
            taken.add(c)
        in_running = {t for t, _ in pairs}
    return sets


@pytest.mark.parametrize("seed", range(6))
def test_one_to_k_matching_equals_the_literal_rules(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_t, n_c = rng.integers(1, 40), rng.integers(1, 150)
    t_logit, c_logit = np.round(rng.normal(0.3, 1.0, n_t), 1), np.round(rng.normal(0.0, 1.0, n_c), 1)
    t_id = rng.permutation(10_000)[:n_t].astype(np.int64)
    c_id = (10_000 + rng.permutation(10_000)[:n_c]).astype(np.int64)
    ratio = int(rng.integers(2, 4))
    expected = literal_sets(t_id, t_logit, c_id, c_logit, 0.2, ratio)
    assert greedy_match_sets(t_id, t_logit, c_id, c_logit, 0.2, ratio) == expected
