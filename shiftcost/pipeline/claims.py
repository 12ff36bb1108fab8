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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shiftcost.errors import ShiftcostError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shiftcost.store import Database

__all__ = [
    "Claim",
    "ClaimLost",
    "PendingBatch",
    "claim_for_assessment",
    "fail_claimed",
    "pending_batches",
    "release_claim",
    "requeue_deferred",
    "guarded_update",
]


class ClaimLost(ShiftcostError):
    """Another run took the batch over (this run's claim expired); nothing was written."""


@dataclass(frozen=True)
class Claim:
    """The right to move one batch on from ``status``, proven by the timestamp ``token``."""

    batch_id: int
    status: str
    token: datetime


def _now() -> datetime:
    from shiftcost.store.models import utcnow

    return utcnow()


def guarded_update(session: Session, claim: Claim, **values: Any) -> None:
    """Update the claimed batch row; raise ``ClaimLost`` unless the claim still holds."""
    from sqlalchemy import update

    from shiftcost.store.models import Batch

    from shiftcost.redaction import redact_text

    values.setdefault("updated_at", _now())
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
    from sqlalchemy import and_, or_, update

    from shiftcost.store.models import Batch

    now = _now()
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


def claim_for_assessment(db: Database, batch_id: int, lease_s: float) -> Claim | None:
    """Claim a registered batch (or one whose assessing run crashed over ``lease_s`` ago)."""
    with db.session() as session:
        return claim(session, batch_id, "registered", "assessing", lease_s=lease_s)


def release_claim(db: Database, claim: Claim) -> bool:
    """Give a claimed batch back (status ``registered``) after a run failed for a passing reason."""
    with db.session() as session:
        try:
            guarded_update(session, claim, status="registered")
        except ClaimLost:
            return False
    return True


def fail_claimed(db: Database, claim: Claim, reason: str) -> bool:
    """Mark a claimed batch failed with ``reason``; False when the claim was lost meanwhile."""
    with db.session() as session:
        try:
            guarded_update(session, claim, status="failed", failure_reason=reason)
        except ClaimLost:
            return False
    return True


@dataclass(frozen=True)
class PendingBatch:
    """A batch waiting for assessment; ``updated_at`` changes whenever its state does."""

    batch_id: int
    fingerprint: str
    updated_at: datetime


def pending_batches(db: Database, model_name: str, lease_s: float) -> list[PendingBatch]:
    """The batches of ``model_name`` waiting for assessment, oldest first.

    Registered batches, and batches whose assessing run has held them for longer than
    ``lease_s`` (it crashed without releasing them).
    """
    from sqlalchemy import and_, or_, select

    from shiftcost.store.models import Batch

    stale = _now() - timedelta(seconds=lease_s)
    query = (
        select(Batch.id, Batch.fingerprint, Batch.updated_at)
        .where(
            Batch.model_name == model_name,
            # The IN lets the (model_name, status) index find them without scanning the history.
            Batch.status.in_(("registered", "assessing")),
            or_(Batch.status == "registered", and_(Batch.status == "assessing", Batch.updated_at < stale)),
        )
        .order_by(Batch.registered_at, Batch.id)
    )
    with db.session(readonly=True) as session:
        return [PendingBatch(*row) for row in session.execute(query)]


def requeue_deferred(db: Database, model_name: str, now: datetime | None = None) -> list[int]:
    """Give deferred batches of ``model_name`` whose retry time has passed back for assessment.

    A batch qualifies while it is ``assessed`` and its latest decision is a ``defer`` whose
    ``retry_after`` (the end of the budget period that was short) is not after ``now``.
    It goes back to ``registered``, so the next assessment decides afresh with the model,
    drift and budgets of that moment; the earlier decision stays in the history. Each move
    is a guarded UPDATE, so of racing watchers exactly one requeues a batch. Returns the
    ids of the batches this call moved, oldest first.
    """
    from sqlalchemy import func, select, update
    from sqlalchemy.orm import aliased

    from shiftcost.store.models import Batch, Decision

    now = _now() if now is None else now
    earlier = aliased(Decision)
    latest = select(func.max(earlier.id)).where(earlier.batch_id == Batch.id).correlate(Batch).scalar_subquery()
    due = (
        select(Batch.id, Batch.updated_at)
        .join(Decision, Decision.id == latest)
        .where(
            Batch.model_name == model_name,
            Batch.status == "assessed",
            Decision.action == "defer",
            Decision.retry_after.is_not(None),
            Decision.retry_after <= now,
        )
        .order_by(Batch.registered_at, Batch.id)
    )
    moved: list[int] = []
    with db.session() as session:
        for batch_id, token in session.execute(due).all():
            statement = (
                update(Batch)
                .where(Batch.id == batch_id, Batch.status == "assessed", Batch.updated_at == token)
                .values(status="registered", updated_at=_now())
                .execution_options(synchronize_session=False)
            )
            if session.execute(statement).rowcount == 1:
                moved.append(batch_id)
    return moved
