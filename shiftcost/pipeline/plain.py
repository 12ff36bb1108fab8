"""The chains run without Prefect: every step a direct call of the library function.

:class:`PlainSteps` is the step runner of :mod:`shiftcost.pipeline.chain` for the command
line, tests and notebooks. It hands a batch from the watch to assessment and from
assessment to retraining in this process; a batch whose assessment fails is given back
and reported, and the poll goes on with the others, as the Prefect ``watch`` flow does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shiftcost.pipeline import chain
from shiftcost.pipeline.assess import (
    AssessOutcome,
    check_drift,
    estimate_cost,
    fail_assessment,
    index_pass,
    load_for_assessment,
    outcome_of,
    store_assessment,
)
from shiftcost.pipeline.claims import claim_for_assessment, pending_batches, release_claim, requeue_deferred
from shiftcost.pipeline.common import connect
from shiftcost.pipeline.intake import Registration, archive_processed, discover_batches, register_batch, register_landed
from shiftcost.pipeline.labels import attach_landed_labels
from shiftcost.pipeline.retrain import (
    RetrainFailed,
    RetrainOutcome,
    build_new_version,
    claim_retrain,
    execute_retrain,
    fail_stale_retrains,
    load_for_retrain,
    not_started,
    record_retrain_failure,
    record_retrain_success,
    refit_cost_model,
)
from shiftcost.redaction import redact_text, redact_url

if TYPE_CHECKING:
    from shiftcost.config import Settings
    from shiftcost.costmodel import CostModel
    from shiftcost.index.engine import IndexReport
    from shiftcost.landing import LandedBatch
    from shiftcost.pipeline.assess import CostEstimate, DriftCheck, LoadedBatch
    from shiftcost.pipeline.claims import Claim, PendingBatch
    from shiftcost.pipeline.retrain import NewVersion, RetrainInputs, RetrainJob
    from shiftcost.retrain import RetrainResult
    from shiftcost.store import Database

__all__ = ["BatchResult", "PlainSteps", "assess_batch", "process_batch", "run_retrain", "watch_once"]

_log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """One batch through the pipeline: its registration, assessment and retraining.

    ``error`` says why its assessment failed (the batch was given back for the next poll);
    ``assessment`` then holds its stored state.
    """

    registration: Registration | None
    assessment: AssessOutcome | None
    retraining: RetrainOutcome | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        result = {
            "registration": None if self.registration is None else self.registration.to_dict(),
            "assessment": None if self.assessment is None else self.assessment.to_dict(),
            "retraining": None if self.retraining is None else self.retraining.to_dict(),
        }
        return result if self.error is None else result | {"error": self.error}


class PlainSteps:
    """The step runner that calls each library step on ``db`` directly.

    ``retrain``: whether a retrain decision is carried out at once (False leaves the
    batch waiting, its budget reserved, for a later ``run_retrain``).
    """

    def __init__(self, db: Database, settings: Settings, *, retrain: bool = True) -> None:
        self.db, self.settings, self.retrain = db, settings, retrain

    # ------------------------------------------------------------------ watch

    def discover(self) -> list[LandedBatch]:
        return discover_batches(self.db, self.settings)

    def register(self, landed: LandedBatch) -> Registration | None:
        try:
            return register_landed(self.db, self.settings, landed)
        except Exception as error:  # the entry stays unknown: the next poll tries it again
            _log.error("could not register %s: %s", redact_url(landed.uri), redact_text(error))
            return None

    def fail_stale_retrains(self) -> Any:
        return fail_stale_retrains(self.db, self.settings.model_name, self.settings.retrain_stale_after_s)

    def requeue_deferred(self) -> Any:
        return requeue_deferred(self.db, self.settings.model_name)

    def before_handoffs(self) -> None:
        """Nothing: hand-offs here run at once, none is left waiting for a worker."""

    def attach_landed_labels(self) -> Any:
        return attach_landed_labels(self.db, self.settings)

    def pending_batches(self) -> list[PendingBatch]:
        return pending_batches(self.db, self.settings.model_name, self.settings.claim_lease_s)

    def hand_to_assess(self, pending: PendingBatch, registration: Registration | None) -> BatchResult:
        try:
            assessment, retraining = chain.assess(self, pending.batch_id)
        except Exception as error:  # given back by the chain; the other batches go on
            message = redact_text(" ".join(str(error).split()) or type(error).__name__)
            _log.error("assessing batch %d failed: %s", pending.batch_id, message)
            stored = None
            with contextlib.suppress(Exception):
                stored = outcome_of(self.db, pending.batch_id)
            return BatchResult(registration, stored, error=message)
        return BatchResult(registration, assessment, retraining)

    def archive_processed(self) -> Any:
        try:
            report = archive_processed(self.db, self.settings)
        except Exception as error:  # processed entries stay where they are until the next poll
            _log.error("could not archive processed landing entries: %s", redact_text(error))
            return None
        for problem in report.problems:
            _log.warning(problem)
        return report

    # ------------------------------------------------------------------ assess

    def claim_batch(self, batch_id: int) -> Claim | None:
        return claim_for_assessment(self.db, batch_id, self.settings.claim_lease_s)

    def batch_outcome(self, batch_id: int) -> AssessOutcome:
        return outcome_of(self.db, batch_id)

    def load_for_assessment(self, claim: Claim) -> LoadedBatch:
        return load_for_assessment(self.db, self.settings, claim)

    def forward_pass(self, loaded: LoadedBatch) -> IndexReport:
        return index_pass(self.settings, loaded)

    def detect_drift(self, loaded: LoadedBatch, report: IndexReport) -> DriftCheck:
        return check_drift(self.settings, loaded, report)

    def predict_cost(self, loaded: LoadedBatch, report: IndexReport, drift: DriftCheck) -> CostEstimate | None:
        return estimate_cost(self.db, self.settings, loaded, report, drift)

    def decide_and_store(self, loaded: LoadedBatch, report: IndexReport, drift: DriftCheck, estimate: CostEstimate | None) -> AssessOutcome:
        return store_assessment(self.db, self.settings, loaded, report, drift, estimate)

    def mark_failed(self, claim: Claim, error: BaseException) -> AssessOutcome:
        return fail_assessment(self.db, claim, error)

    def release(self, claim: Claim) -> None:
        # If the database is down too, the claim's lease expires and the batch is pending again.
        with contextlib.suppress(Exception):
            release_claim(self.db, claim)

    def hand_to_retrain(self, outcome: AssessOutcome) -> RetrainOutcome | None:
        if not self.retrain:
            return None
        try:
            return chain.retrain(self, outcome.batch_id)
        except RetrainFailed as error:  # recorded; the assessment stands
            return error.outcome

    # ------------------------------------------------------------------ retrain

    def claim_retrain(self, batch_id: int) -> RetrainJob | None:
        return claim_retrain(self.db, batch_id)

    def not_started(self, batch_id: int) -> RetrainOutcome:
        return not_started(self.db, batch_id)

    def heartbeat(self, job: RetrainJob) -> AbstractContextManager[None]:
        from shiftcost.pipeline.lease import heartbeat

        return heartbeat(self.db, job.run_id, self.settings.retrain_heartbeat_s)

    def load_inputs(self, job: RetrainJob) -> RetrainInputs:
        return load_for_retrain(self.db, self.settings, job)

    def retrain_to_cutoff(self, inputs: RetrainInputs) -> RetrainResult:
        return execute_retrain(self.settings, inputs)

    def build_new_version(self, inputs: RetrainInputs, result: RetrainResult) -> NewVersion | None:
        return build_new_version(self.settings, inputs, result)

    def refit_cost_model(self, inputs: RetrainInputs, result: RetrainResult) -> tuple[CostModel | None, str | None]:
        return refit_cost_model(self.db, inputs, result)

    def record_success(
        self, inputs: RetrainInputs, result: RetrainResult, new_version: NewVersion | None, cost_model: CostModel | None, note: str | None
    ) -> RetrainOutcome:
        return record_retrain_success(self.db, inputs, result, new_version, cost_model, [note] if note else None)

    def record_failure(self, job: RetrainJob, error: BaseException, measured: RetrainResult | None) -> RetrainOutcome:
        return record_retrain_failure(self.db, job, error, measured)


# ---------------------------------------------------------------------- entry points


@contextmanager
def _database(settings: Settings, db: Database | None) -> Iterator[Database]:
    if db is not None:
        yield db
    else:
        with connect(settings) as opened:
            yield opened


def assess_batch(db: Database, settings: Settings, batch_id: int) -> AssessOutcome:
    """Claim and assess one registered batch, processed at most once; a retrain decision
    leaves it waiting, its budget reserved. A failure other than the batch's own is raised
    after the claim is given back."""
    return chain.assess(PlainSteps(db, settings, retrain=False), batch_id)[0]


def run_retrain(db: Database, settings: Settings, batch_id: int) -> RetrainOutcome:
    """Retrain on a batch decided for retraining, once; raises ``RetrainFailed`` after recording a failure."""
    return chain.retrain(PlainSteps(db, settings), batch_id)


def process_batch(settings: Settings, uri: str, *, retrain: bool = True, db: Database | None = None) -> BatchResult:
    """Register the batch at ``uri`` and take it through assessment and, if decided, retraining.

    A batch registered before is not processed again: its stored state comes back.
    A failed retraining is recorded (run failed, its measured spend settled) and returned.
    A failure of the assessment other than the batch's own is raised (the batch is given back).
    """
    with _database(settings, db) as database:
        registration = register_batch(database, settings, uri)
        if registration.status != "registered":
            return BatchResult(registration, outcome_of(database, registration.batch_id))
        assessment, retraining = chain.assess(PlainSteps(database, settings, retrain=retrain), registration.batch_id)
        if not retrain and assessment.retrain_pending and assessment.decision_id is not None:
            # No run follows to settle it: a reservation never outlives its decision. A later
            # `shiftcost retrain` still records its spend (a late settlement).
            from shiftcost.store import ledger

            with database.session() as session:
                ledger.release_decision(session, assessment.decision_id, "assessed without retraining (--no-retrain): no run holds this reservation")
        return BatchResult(registration, assessment, retraining)


def watch_once(settings: Settings, *, retrain: bool = True, db: Database | None = None) -> list[BatchResult]:
    """One poll of the landing location (:func:`shiftcost.pipeline.chain.watch`), every batch
    processed here; the batches that failed at registration come first.

    A batch whose assessment fails for a reason other than its own (a model file missing, a
    full disk) is given back and reported with its ``error``; the others go on.
    """
    with _database(settings, db) as database:
        poll = chain.watch(PlainSteps(database, settings, retrain=retrain))
        failed = [
            BatchResult(registration, outcome_of(database, batch_id, processed=True))
            for batch_id, registration in poll.registrations.items()
            if registration.created and registration.status == "failed"
        ]
        return failed + poll.handed
