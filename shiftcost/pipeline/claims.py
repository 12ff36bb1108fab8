"""Claiming batches for a step, each claim its own short transaction.

The transitions and their guarded UPDATEs are in ``shiftcost.store.batches`` (see the
diagram there); these functions open the transaction around each one.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from shiftcost.statuses import BatchStatus
from shiftcost.store.records import Claim, ClaimLost, PendingBatch

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shiftcost.store import Database

__all__ = [
    "Claim",
    "ClaimLost",
    "PendingBatch",
    "claim",
    "claim_for_assessment",
    "fail_claimed",
    "guarded_update",
    "pending_batches",
    "release_claim",
    "requeue_deferred",
]


def claim(session: Session, batch_id: int, from_status: str, to_status: str, *, lease_s: float | None = None) -> Claim | None:
    """Move a batch from ``from_status`` (or a stale ``to_status``) to ``to_status``; None if taken."""
    from shiftcost.store import batches

    return batches.claim(session, batch_id, from_status, to_status, lease_s=lease_s)


def guarded_update(session: Session, claim: Claim, **values: object) -> None:
    """Update the claimed batch row; raise ``ClaimLost`` unless the claim still holds."""
    from shiftcost.store import batches

    batches.guarded_update(session, claim, **values)


def claim_for_assessment(db: Database, batch_id: int, lease_s: float) -> Claim | None:
    """Claim a registered batch (or one whose assessing run crashed over ``lease_s`` ago)."""
    with db.session() as session:
        return claim(session, batch_id, BatchStatus.REGISTERED, BatchStatus.ASSESSING, lease_s=lease_s)


def release_claim(db: Database, claim: Claim) -> bool:
    """Give a claimed batch back (status ``registered``) after a run failed for a passing reason."""
    return _move_claimed(db, claim, status=BatchStatus.REGISTERED)


def fail_claimed(db: Database, claim: Claim, reason: str) -> bool:
    """Mark a claimed batch failed with ``reason``; False when the claim was lost meanwhile."""
    return _move_claimed(db, claim, status=BatchStatus.FAILED, failure_reason=reason)


def _move_claimed(db: Database, claim: Claim, **values: str) -> bool:
    with db.session() as session:
        try:
            guarded_update(session, claim, **values)
        except ClaimLost:
            return False
    return True


def pending_batches(db: Database, model_name: str, lease_s: float) -> list[PendingBatch]:
    """The batches of ``model_name`` waiting for assessment, oldest first.

    Registered batches, and batches whose assessing run has held them for longer than
    ``lease_s`` (it crashed without releasing them).
    """
    from shiftcost.store import batches

    with db.session(readonly=True) as session:
        return batches.pending(session, model_name, lease_s)


def requeue_deferred(db: Database, model_name: str, now: datetime | None = None) -> list[int]:
    """Give deferred batches of ``model_name`` whose retry time has passed back for assessment.

    A batch qualifies while it is ``assessed`` and its latest decision is a ``defer`` whose
    ``retry_after`` (the end of the budget period that was short) is not after ``now``.
    It goes back to ``registered``, so the next assessment decides afresh with the model,
    drift and budgets of that moment; the earlier decision stays in the history. Each move
    is a guarded UPDATE, so of racing watchers exactly one requeues a batch. Returns the
    ids of the batches this call moved, oldest first.
    """
    from shiftcost.store import batches
    from shiftcost.store.models import utcnow

    with db.session() as session:
        return batches.requeue_deferred(session, model_name, utcnow() if now is None else now)
