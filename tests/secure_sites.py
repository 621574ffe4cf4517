"""Helpers for the secure-aggregation tests: a masked study over in-memory sites, captured.

The sites are :class:`tests.rows_site.RowsSite` (the real partial computations, guard and
site-side masking, with real X25519 keys); every reply goes through its canonical bytes,
as on the wire, and is kept so a test can look at what the coordinator received.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.plan import StudyPlan
from shared.protocol.messages import RoundReply, RoundRequest, decode_reply
from shared.protocol.model import StudyProtocol
from site_agent.secure_aggregation import from_settings
from site_agent.settings import DisclosurePolicy, SecureAggregationSettings
from tests.rows_site import RowsSite, rows_from_frame
from tests.test_adjusted_estimators import COVARIATES, make_rows, protocol, split

PLAIN = protocol(analyses=["crude", "propensity"])
SECURE = protocol(analyses=["crude", "propensity"], secure_aggregation=True)
POLICY = DisclosurePolicy(min_cell_count=1)


def frame_of(k: int, seed: int = 5) -> pd.DataFrame:
    return split(make_rows(900, whole_days=True, seed=seed), k)


def sites_of(frame: pd.DataFrame, study: StudyProtocol, policy: DisclosurePolicy = POLICY) -> list[RowsSite]:
    return [RowsSite(site_id, rows_from_frame(rows, COVARIATES), study, policy) for site_id, rows in frame.groupby("site_id")]


def raw_public(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def signed_sites(frame: pd.DataFrame, study: StudyProtocol, tmp_path: Path) -> list[RowsSite]:
    """Sites that sign their run keys and check each other's against a full roster, set up
    from site.toml-style settings (PEM identity key files) as a site agent is."""
    identities = {site_id: Ed25519PrivateKey.generate() for site_id in sorted(frame.site_id.unique())}
    roster = {site_id: raw_public(key) for site_id, key in identities.items()}
    sites = []
    for site_id, rows in frame.groupby("site_id"):
        pem = tmp_path / f"{site_id}.pem"
        pem.write_bytes(identities[str(site_id)].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
        ))
        secure = from_settings(str(site_id), SecureAggregationSettings(identity_key=pem, peers=roster))
        sites.append(RowsSite(str(site_id), rows_from_frame(rows, COVARIATES), study, POLICY, secure=secure))
    return sites


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
