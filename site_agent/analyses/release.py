"""What a partial computation hands to the disclosure guard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Release:
    """Values to send, and the person/event counts they rest on, for the guard to check."""

    values: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    parts: dict[str, Release] = field(default_factory=dict)
    """Separable pieces (e.g. one per analysis): one whose counts are too small is withheld
    alone, sent as ``{"withheld": reason}`` under ``values["parts"]``, and the rest still go."""
    paths: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    """Where a count sits in ``values`` (keys and list indexes), for the guard to noise it in
    place, and to suppress it there; a small count without a path suppresses its whole task
    (or part)."""
    hides: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    """What to blank when a count is suppressed, where more than its own cell must go (e.g. a
    whole arm: its person-days would describe its few persons); default: its path."""
    withheld: str | None = None
    """Set when the site refused to compute this task (e.g. a model at coefficients beyond its
    bound): the task is sent as ``{"withheld": reason}`` and the reply's other tasks still go."""
