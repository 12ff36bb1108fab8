"""The fixed vocabularies of the database: statuses, actions and entry kinds.

Each enum lists exactly the values its table's CHECK constraint allows
(``shiftcost.store.models`` builds the constraints from these), so a typo in a status
is an ``AttributeError`` at import rather than a constraint violation at run time.
Members are ``str``: they compare equal to, and are stored as, their plain values.

Kept free of SQLAlchemy and torch so any layer (CLI, policy, report) can import it.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """Where a batch is in its life: registered, then assessed, then retrained or not."""

    REGISTERED = "registered"
    ASSESSING = "assessing"
    ASSESSED = "assessed"
    AWAITING_LABELS = "awaiting_labels"
    RETRAINING = "retraining"
    DONE = "done"
    FAILED = "failed"
    STOPPED_BY_BUDGET = "stopped_by_budget"


class ModelStatus(StrEnum):
    """A model version's standing.

    ACTIVE: in service when it is the newest active version; PENDING: passed the
    promotion gate and waits for approval; REJECTED: failed the gate, kept with its figures.
    """

    ACTIVE = "active"
    PENDING = "pending"
    REJECTED = "rejected"


class DecisionAction(StrEnum):
    """What was decided for a batch."""

    RETRAIN = "retrain"
    SKIP = "skip"
    DEFER = "defer"


class RetrainStatus(StrEnum):
    """How a retrain run ended (RUNNING until it does)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CAP_REACHED = "cap_reached"
    STOPPED_BY_BUDGET = "stopped_by_budget"


class LedgerKind(StrEnum):
    """A budget ledger entry: a reservation, or the settle/release that closes one."""

    RESERVE = "reserve"
    SETTLE = "settle"
    RELEASE = "release"


class CalibrationSource(StrEnum):
    """Where a cost-model calibration came from."""

    SWEEP = "sweep"
    REFIT = "refit"


class BudgetPeriod(StrEnum):
    """The window a budget's caps apply to."""

    PER_RUN = "per_run"
    DAILY = "daily"
    MONTHLY = "monthly"
    ROLLING_DAYS = "rolling_days"


class LandingEntryState(StrEnum):
    """What became of an entry seen in the landing area."""

    REGISTERED = "registered"
    DUPLICATE = "duplicate"
    FAILED = "failed"


class LandingEntryKind(StrEnum):
    """What an entry in the landing area is on disk."""

    FILE = "file"
    FOLDER = "folder"
    LINK = "link"
    SPECIAL = "special"


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The plain string values of ``enum``, in declaration order."""
    return tuple(member.value for member in enum)
