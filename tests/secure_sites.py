"""Helpers for the secure-aggregation tests: a masked study over in-memory sites, captured.

The sites are :class:`tests.rows_site.RowsSite` (the real partial computations, guard and
site-side masking, with real X25519 keys); every reply goes through its canonical bytes,
as on the wire, and is kept so a test can look at what the coordinator received.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from coordinator.plan import StudyPlan
from shared.protocol.messages import RoundReply, RoundRequest, decode_reply
from shared.protocol.model import StudyProtocol
from site_agent.settings import DisclosurePolicy
from tests.rows_site import RowsSite, rows_from_frame
from tests.test_adjusted_estimators import COVARIATES, make_rows, protocol, split

PLAIN = protocol(analyses=["crude", "propensity"])
SECURE = protocol(analyses=["crude", "propensity"], secure_aggregation=True)
POLICY = DisclosurePolicy(min_cell_count=1)


def frame_of(k: int, seed: int = 5) -> pd.DataFrame:
    return split(make_rows(900, whole_days=True, seed=seed), k)


def sites_of(frame: pd.DataFrame, study: StudyProtocol, policy: DisclosurePolicy = POLICY) -> list[RowsSite]:
    return [RowsSite(site_id, rows_from_frame(rows, COVARIATES), study, policy) for site_id, rows in frame.groupby("site_id")]


@dataclass
class Exchange:
    """One round: the request and the reply bytes of every site."""

    request: RoundRequest
    replies: dict[str, bytes] = field(default_factory=dict)

    def decoded(self) -> dict[str, RoundReply]:
        return {site_id: decode_reply(raw) for site_id, raw in self.replies.items()}


def run(sites: list[RowsSite], study: StudyProtocol) -> tuple[StudyPlan, list[Exchange]]:
    """The study to the end, every exchange kept."""
    plan, exchanges = StudyPlan(study), []
    while (request := plan.next_request()) is not None:
        exchange = Exchange(request, {site.site_id: site.reply(request).to_bytes() for site in sites})
        exchanges.append(exchange)
        plan.absorb(exchange.decoded())
    return plan, exchanges
