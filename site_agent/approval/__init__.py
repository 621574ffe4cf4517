"""Steward approval: a study runs at a site only after its data steward approved the protocol.

The approval is of the whole protocol's SHA-256 (``StudyProtocol.sha256()``), so one approval
covers all of a protocol's comparisons and any change to the protocol needs a new one.
"""

from site_agent.approval.store import Approval, ApprovalStore, PendingStudy, approval_store

__all__ = ["Approval", "ApprovalStore", "PendingStudy", "approval_store"]
