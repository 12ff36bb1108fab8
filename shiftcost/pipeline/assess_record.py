"""What an assessment leaves behind, read back: the stored outcome of a batch, and its failure.

``store_assessment`` (in ``shiftcost.pipeline.assess``) writes an assessment; the functions
here mark a claimed batch failed and read a batch's stored state, e.g. when another run had
it or a flow lost a step's return value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from shiftcost.pipeline.claims import Claim, fail_claimed
from shiftcost.pipeline.common import json_safe
from shiftcost.statuses import DecisionAction

if TYPE_CHECKING:
    from shiftcost.store import Database

__all__ = ["AssessOutcome", "fail_assessment", "outcome_of"]


@dataclass
class AssessOutcome:
    """What happened to one batch; ``processed`` is False when another run had it."""

    batch_id: int
    status: str
    processed: bool
    source_uri: str | None = None
    fingerprint: str | None = None
    action: str | None = None
    decision_id: int | None = None
    summary: str | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)
    drift: bool | None = None
    drift_report: str | None = None
    indices: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    #: Which forecast the decision used (``index`` or ``probe``) and why no probe or a probe ran.
    forecast_stage: str | None = None
    probe_advice: str | None = None
    #: What the probe spent (steps, sample-gradients, seconds, kWh), when one ran.
    probe_cost: dict[str, Any] | None = None
    failure_reason: str | None = None
    model_version: int | None = None

    @property
    def retrain_pending(self) -> bool:
        """Whether this assessment decided to retrain (and reserved the budget for it)."""
        return self.processed and self.action == DecisionAction.RETRAIN

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self) | {"retrain_pending": self.retrain_pending})


def fail_assessment(db: Database, claim: Claim, error: BaseException) -> AssessOutcome:
    """Mark a claimed batch failed with the error's sentence; the outcome of the batch."""
    fail_claimed(db, claim, str(error))
    return outcome_of(db, claim.batch_id, processed=True)


def outcome_of(db: Database, batch_id: int, *, processed: bool = False) -> AssessOutcome:
    """The stored state of a batch (status, latest decision), e.g. when another run had it."""
    from shiftcost.store import repository

    with db.session(readonly=True) as session:
        batch = repository.get_batch(session, batch_id)
        decision = repository.latest_decision(session, batch_id)
        return AssessOutcome(
            batch_id=batch_id,
            status=batch.status,
            processed=processed,
            source_uri=batch.source_uri,
            fingerprint=batch.fingerprint,
            action=None if decision is None else decision.action,
            decision_id=None if decision is None else decision.id,
            reasons=[] if decision is None else list(decision.reasons),
            failure_reason=batch.failure_reason,
        )
