"""Batch status transitions, each a guarded UPDATE, so a batch is processed once.

::

    registered ──claim──> assessing ──store──> done        (skip)
      ^   ^                  │    │        └──> assessed    (retrain pending, or deferred)
      │   └──── release ─────┘    └──fail───> failed
      └── requeue (deferred, its retry time passed) ── assessed
    assessed ──claim──> retraining ──> done | failed

A claim is ``UPDATE batches SET status = 'assessing', updated_at = :now WHERE id = :id AND
status = 'registered'``: of any number of racing runs exactly one changes the row, the
others see a row count of 0 and leave the batch alone. The claim's timestamp is its token;
every later write of the claimant repeats it in its WHERE clause, so a claimant that lost
its claim cannot overwrite anything. A claim older than the lease (its run crashed without
releasing it) may be taken over by another run.

Every function runs in the caller's session; the caller commits.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from shiftcost.redaction import redact_text
from shiftcost.statuses import BatchStatus, DecisionAction
from shiftcost.store.models import Batch, Decision, RetrainRun, utcnow
from shiftcost.store.records import Claim, ClaimLost, PendingBatch

__all__ = [
    "Claim",
    "ClaimLost",
    "PendingBatch",
    "awaiting_labels",
    "claim",
    "find_by_reference",
    "guarded_update",
    "pending",
    "reopen_with_labels",
    "requeue_deferred",
    "retrain_runs_of",
]


def guarded_update(session: Session, claim: Claim, **values: Any) -> None:
    """Update the claimed batch row; raise ``ClaimLost`` unless the claim still holds."""
    values.setdefault("updated_at", utcnow())
    if values.get("failure_reason"):
        values["failure_reason"] = redact_text(values["failure_reason"])
    statement = (
        update(Batch)
        .where(Batch.id == claim.batch_id, Batch.status == claim.status, Batch.updated_at == claim.token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if session.execute(statement).rowcount != 1:
        raise ClaimLost(f"Batch {claim.batch_id} was taken over by another run; this run wrote nothing.")
    # ORM objects of this batch loaded earlier in the session must not shadow the new values.
    session.expire_all()


def claim(session: Session, batch_id: int, from_status: str, to_status: str, *, lease_s: float | None = None) -> Claim | None:
    """Move a batch from ``from_status`` (or a stale ``to_status``) to ``to_status``; None if taken."""
    now = utcnow()
    condition = Batch.status == from_status
    if lease_s is not None:
        stale = now - timedelta(seconds=lease_s)
        condition = or_(condition, and_(Batch.status == to_status, Batch.updated_at < stale))
    statement = (
        update(Batch)
        .where(Batch.id == batch_id, condition)
        .values(status=to_status, updated_at=now, failure_reason=None)
        .execution_options(synchronize_session=False)
    )
    if session.execute(statement).rowcount != 1:
        return None
    return Claim(batch_id, to_status, now)


def pending(session: Session, model_name: str, lease_s: float) -> list[PendingBatch]:
    """The batches of ``model_name`` waiting for assessment, oldest first.

    Registered batches, and batches whose assessing run has held them for longer than
    ``lease_s`` (it crashed without releasing them).
    """
    stale = utcnow() - timedelta(seconds=lease_s)
    registered, assessing = BatchStatus.REGISTERED, BatchStatus.ASSESSING
    query = (
        select(Batch.id, Batch.fingerprint, Batch.updated_at)
        .where(
            Batch.model_name == model_name,
            # The IN lets the (model_name, status) index find them without scanning the history.
            Batch.status.in_((registered, assessing)),
            or_(Batch.status == registered, and_(Batch.status == assessing, Batch.updated_at < stale)),
        )
        .order_by(Batch.registered_at, Batch.id)
    )
    return [PendingBatch(*row) for row in session.execute(query)]


def requeue_deferred(session: Session, model_name: str, now: datetime) -> list[int]:
    """Move the deferred batches of ``model_name`` due at ``now`` back to ``registered``.

    Due: ``assessed`` with a latest decision that is a ``defer`` whose ``retry_after`` is
    not after ``now``. Each move is a guarded UPDATE (status and token), so of racing
    watchers exactly one requeues a batch. Returns the ids moved, oldest first.
    """
    earlier = aliased(Decision)
    latest = select(func.max(earlier.id)).where(earlier.batch_id == Batch.id).correlate(Batch).scalar_subquery()
    due = (
        select(Batch.id, Batch.updated_at)
        .join(Decision, Decision.id == latest)
        .where(
            Batch.model_name == model_name,
            Batch.status == BatchStatus.ASSESSED,
            Decision.action == DecisionAction.DEFER,
            Decision.retry_after.is_not(None),
            Decision.retry_after <= now,
        )
        .order_by(Batch.registered_at, Batch.id)
    )
    moved: list[int] = []
    for batch_id, token in session.execute(due).all():
        statement = (
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.ASSESSED, Batch.updated_at == token)
            .values(status=BatchStatus.REGISTERED, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if session.execute(statement).rowcount == 1:
            moved.append(batch_id)
    return moved


# ----------------------------------------------------------------------------- labels that come later


def find_by_reference(session: Session, batch_ref: str) -> Batch | None:
    """The batch ``batch_ref`` names: its id, or its source URI (a local path as given or absolute)."""
    query = select(Batch)
    if str(batch_ref).isdigit():
        query = query.where(Batch.id == int(batch_ref))
    else:
        uri = os.path.abspath(batch_ref) if "://" not in str(batch_ref) else str(batch_ref)
        query = query.where(Batch.source_uri.in_([str(batch_ref), uri]))
    return session.scalars(query.order_by(Batch.id.desc()).limit(1)).first()


def retrain_runs_of(session: Session, batch_id: int) -> int:
    """How many retrain runs the batch has had."""
    return session.scalar(select(func.count()).select_from(RetrainRun).where(RetrainRun.batch_id == batch_id)) or 0


def reopen_with_labels(session: Session, batch: Batch, labels_uri: str) -> bool:
    """Attach ``labels_uri`` and give the batch back for assessment, unless it changed since
    ``batch`` was read (guarded, as every status change: a run that took it meanwhile keeps it)."""
    statement = (
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == batch.status, Batch.updated_at == batch.updated_at)
        .values(labels_uri=labels_uri, has_labels=True, status=BatchStatus.REGISTERED, updated_at=utcnow())
    )
    return session.execute(statement).rowcount == 1


def awaiting_labels(session: Session, model_name: str) -> list[tuple[int, str]]:
    """(id, source URI) of the batches of ``model_name`` waiting for their labels."""
    query = select(Batch.id, Batch.source_uri).where(Batch.model_name == model_name, Batch.status == BatchStatus.AWAITING_LABELS)
    return [(batch_id, uri) for batch_id, uri in session.execute(query)]
