"""The landing entries a poll has seen: looked up by location and signature, archived, purged.

Every function runs in the caller's session; the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shiftcost.statuses import BatchStatus, LandingEntryState
from shiftcost.store.models import Batch, LandingEntry, utcnow

__all__ = ["expired", "find", "known_signatures", "mark_archived", "mark_purged", "record", "to_archive"]

#: A batch in one of these states is never read again, so its entry may leave the landing area.
FINAL_BATCH_STATUSES = (BatchStatus.DONE, BatchStatus.FAILED, BatchStatus.STOPPED_BY_BUDGET)


def known_signatures(session: Session, model_name: str, locations: Sequence[str]) -> set[tuple[str, str]]:
    """The (location, signature) pairs recorded for ``model_name`` among ``locations``."""
    query = select(LandingEntry.location, LandingEntry.signature).where(
        LandingEntry.model_name == model_name, LandingEntry.location.in_(list(locations))
    )
    return {(location, signature) for location, signature in session.execute(query)}


def find(session: Session, model_name: str, location: str, signature: str) -> LandingEntry | None:
    """The entry recorded for this location and signature, if any."""
    query = select(LandingEntry).where(
        LandingEntry.model_name == model_name, LandingEntry.location == location, LandingEntry.signature == signature
    )
    return session.scalars(query).first()


def record(session: Session, model_name: str, landed: Any, state: str, batch_id: int, reason: str | None) -> None:
    """Insert the entry ``landed`` (a ``shiftcost.landing.LandedBatch``) unless a racing
    watcher did (checked first: a conflict would use up an id)."""
    if find(session, model_name, landed.uri, landed.signature) is not None:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(LandingEntry)
        .values(
            model_name=model_name, location=landed.uri, signature=landed.signature, kind=landed.kind, size=landed.size,
            state=state, batch_id=batch_id, reason=reason, seen_at=utcnow(),
        )  # fmt: skip
        .on_conflict_do_nothing(index_elements=["model_name", "location", "signature"])
    )
    session.execute(statement)


def to_archive(session: Session, model_name: str) -> list[tuple[int, str]]:
    """(id, location) of the entries not archived yet whose batch is final, or that are not
    a registration of their own (duplicates, failures), oldest first."""
    query = (
        select(LandingEntry.id, LandingEntry.location)
        .outerjoin(Batch, Batch.id == LandingEntry.batch_id)
        .where(
            LandingEntry.model_name == model_name,
            LandingEntry.purged_at.is_(None),
            LandingEntry.archived_at.is_(None),
            or_(LandingEntry.state != LandingEntryState.REGISTERED, Batch.status.in_(FINAL_BATCH_STATUSES)),
        )
        .order_by(LandingEntry.id)
    )
    return [(entry_id, location) for entry_id, location in session.execute(query)]


def mark_archived(session: Session, entry_id: int, at: datetime, archive_uri: str | None) -> None:
    """Record that the entry was moved to ``archive_uri`` (None: it was gone already)."""
    session.execute(
        update(LandingEntry)
        .where(LandingEntry.id == entry_id, LandingEntry.archived_at.is_(None))
        .values(archived_at=at, archive_uri=archive_uri)
        .execution_options(synchronize_session=False)
    )


def expired(session: Session, model_name: str, archived_before: datetime) -> list[tuple[int, str | None]]:
    """(id, archive URI) of the entries archived before ``archived_before`` and not purged yet."""
    query = (
        select(LandingEntry.id, LandingEntry.archive_uri)
        .where(LandingEntry.model_name == model_name, LandingEntry.purged_at.is_(None), LandingEntry.archived_at < archived_before)
        .order_by(LandingEntry.id)
    )
    return [(entry_id, uri) for entry_id, uri in session.execute(query)]


def mark_purged(session: Session, entry_id: int, at: datetime) -> None:
    """Record that the archived entry was deleted."""
    session.execute(
        update(LandingEntry).where(LandingEntry.id == entry_id).values(purged_at=at).execution_options(synchronize_session=False)
    )
