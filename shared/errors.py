"""The one exception tree of fedrwe.

Every error a user can meet is one of these; each message names *where* (site, table,
field), *what* (the value) and *the fix*.

    FedRWEError
     +-- ProtocolError          a study protocol or round request is malformed
     +-- SettingsError          a site's or a command's own settings are unusable
     +-- DataError              a site's tables are missing, broken or unusable
     |    +-- MissingTableError one OMOP table is absent at a site
     |    +-- IngestError       an OMOP export cannot be loaded into the site's tables
     |    +-- DataQualityError  the site's tables fail a check that blocks a study
     |    +-- UnmatchedConceptSetError  a protocol's concept set matches no record at a site
     +-- DisclosureRefused      the site's disclosure guard refused a release
     +-- InsufficientSites      too few sites answered a round
     +-- ConvergenceError       an iterative fit did not converge
     +-- SecureAggregationError a masked sum cannot be unmasked or fails its self-check
     +-- SiteError              a site answered a round with an error
     +-- TransportError         a process, port or message could not be used
     +-- InvalidEnvelope        a message failed verification (opaque on purpose)
     +-- NotApproved            a site's steward has not approved the protocol's hash
"""

from __future__ import annotations

from dataclasses import dataclass


class FedRWEError(Exception):
    """Base of every fedrwe error."""


class ProtocolError(FedRWEError):
    """A study protocol or a round request is malformed."""


class SettingsError(FedRWEError):
    """A site's settings file or a command's options cannot be used."""


class DataError(FedRWEError):
    """A site's data cannot be used for the study as asked."""


class MissingTableError(DataError):
    """An OMOP table the study needs is not present at a site."""

    def __init__(self, site_id: str, table: str, path: str, needed_because: str | None = None) -> None:
        self.site_id = site_id
        self.table = table
        self.path = path
        why = f"; the study needs it because {needed_because}" if needed_because else ""
        super().__init__(
            f"site {site_id!r}: OMOP table {table!r} is missing (no Delta table at {path}){why}. "
            f"Fix: ingest the site's OMOP export ({table} included) into {path} (fedrwe site ingest), "
            f"or point the site's config `lake` at the folder that holds it."
        )


class IngestError(DataError):
    """An OMOP CDM export cannot be loaded; the site's tables are left as they were."""


class DataQualityError(DataError):
    """The site's OMOP tables fail a data-quality check that blocks a study.

    ``report_path`` is where the full report (every finding, warnings too) was written.
    """

    def __init__(self, message: str, report_path: str | None = None) -> None:
        super().__init__(message)
        self.report_path = report_path


@dataclass(frozen=True)
class UnmatchedConceptSet:
    """One concept set that matched nothing: the protocol field, the set's name and codes
    (as text) and the table (with the columns) that was searched."""

    field: str
    name: str
    codes: str
    table: str


class UnmatchedConceptSetError(DataError):
    """Concept sets of the protocol match no record in a site's tables.

    Without this error the site's cohort would be empty (or have no outcomes at all) and the
    study would fail later with a puzzling "no events". The cohort builder raises it without
    a site; the dataset store raises it again with the site's id (``at_site``).
    """

    def __init__(self, unmatched: list[UnmatchedConceptSet], site_id: str | None = None) -> None:
        self.unmatched = list(unmatched)
        self.site_id = site_id
        where = f"site {site_id!r}" if site_id else "this site"
        sets = "; ".join(
            f"`{u.field}` ({u.name}: {u.codes}) searched in {u.table}" for u in self.unmatched
        )
        super().__init__(
            f"{where}: no record matches {len(self.unmatched)} concept set(s) of the protocol, so its "
            f"cohort would be empty or without outcomes: {sets}. Fix: check how the site codes these "
            f"records - its coding or vocabulary may differ from the protocol's (source codes are "
            f"matched on *_source_value, standard concepts on *_concept_id) - and map its source "
            f"codes to standard concepts (OHDSI Usagi) or to the protocol's codes; a site with truly "
            f"none of these records cannot take part in this study."
        )

    def at_site(self, site_id: str) -> UnmatchedConceptSetError:
        """The same error, naming the site."""
        return UnmatchedConceptSetError(self.unmatched, site_id)


class DisclosureRefused(FedRWEError):
    """The site's disclosure guard refused to release a reply.

    ``counts`` holds the values that were too small; they stay at the site.
    """

    def __init__(self, message: str, counts: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.counts = dict(counts or {})


class InsufficientSites(FedRWEError):
    """Fewer sites answered a round than the study needs."""


class ConvergenceError(FedRWEError):
    """An iterative estimator did not converge."""


class SecureAggregationError(FedRWEError):
    """A masked (secure-aggregation) sum is incomplete, inconsistent or fails its self-check."""


class SiteError(FedRWEError):
    """A site answered a round with an error; the message carries the site's reason."""

    def __init__(self, site_id: str, reason: str) -> None:
        self.site_id = site_id
        self.reason = reason
        super().__init__(f"site {site_id!r} failed: {reason}")


class TransportError(FedRWEError):
    """A process, port or message of the transport could not be used."""


class NoReply(TransportError):
    """Some nodes did not reply within a round's timeout: ``replies`` holds the replies that
    came (node id -> bytes), ``missing`` the silent node ids."""

    def __init__(self, message: str, replies: dict[int, bytes], missing: list[int]) -> None:
        super().__init__(message)
        self.replies = dict(replies)
        self.missing = list(missing)


ENVELOPE_REJECTED = (
    "envelope rejected. Fix: check that the coordinator and the sites hold each other's current "
    "public keys (keyrings), that their clocks agree, and start a new run of the study rather "
    "than resending old messages."
)


class InvalidEnvelope(FedRWEError):
    """A message failed verification. Deliberately opaque: it never says why.

    ``detail`` (which check failed) is for the receiver's own log only; it is not part of
    the message, so nothing that reaches the sender tells it which check to work around.
    """

    def __init__(self, detail: str = "", where: str = "") -> None:
        self.detail = detail
        super().__init__(f"{where}: {ENVELOPE_REJECTED}" if where else ENVELOPE_REJECTED)


class NotApproved(FedRWEError):
    """A site's data steward has not approved this study protocol (its SHA-256)."""


class NotAParticipant(FedRWEError):
    """A request's run leaves this site out (it dropped out earlier); nothing is computed."""
