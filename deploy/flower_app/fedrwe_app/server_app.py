"""ServerApp component: the coordinator's app from the installed fedrwe package."""

from coordinator.flower_server import app

__all__ = ["app"]
