"""ClientApp component: the site's forwarder from the installed fedrwe package."""

from site_agent.flower_client import app

__all__ = ["app"]
