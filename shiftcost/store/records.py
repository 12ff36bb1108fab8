"""Plain records the store hands to its callers, importable without SQLAlchemy.

The pipeline passes these between its steps (and Prefect tasks pickle them), so they must
not drag the database layer into a process that only carries them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shiftcost.errors import ShiftcostError

__all__ = ["Claim", "ClaimLost", "PendingBatch"]


class ClaimLost(ShiftcostError):
    """Another run took the batch over (this run's claim expired); nothing was written."""


@dataclass(frozen=True)
class Claim:
    """The right to move one batch on from ``status``, proven by the timestamp ``token``."""

    batch_id: int
    status: str
    token: datetime


@dataclass(frozen=True)
class PendingBatch:
    """A batch waiting for assessment; ``updated_at`` changes whenever its state does."""

    batch_id: int
    fingerprint: str
    updated_at: datetime
