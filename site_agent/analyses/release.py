"""What a partial computation hands to the disclosure guard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Release:
    """Values to send, and the person/event counts they rest on, for the guard to check."""

    values: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
