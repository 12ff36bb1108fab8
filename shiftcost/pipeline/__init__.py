"""The pipeline's steps as plain functions: register, assess, decide, retrain, learn.

The Prefect tasks in ``tasks/`` and flows in ``flows/`` wrap these functions one to one
(retries, timeouts, logging); nothing here imports Prefect, so the same steps run from the
command line (``shiftcost assess PATH``), from tests and from notebooks.

Typical use without Prefect::

    from shiftcost.config import load_settings
    from shiftcost import pipeline

    settings = load_settings()
    pipeline.bootstrap(settings, model, spec, x_ref, y_ref, calibration=rows)
    for result in pipeline.watch_once(settings):     # every new batch in the landing folder
        print(result.assessment.summary)

Each batch is registered once by content fingerprint and moves through guarded status
transitions (``shiftcost.store.batches``), so it is assessed and retrained at most once,
whatever the retries, restarts and concurrent watchers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shiftcost.pipeline.assess import (
    AssessOutcome,
    CostEstimate,
    DriftCheck,
    LoadedBatch,
    assess_batch,
    check_drift,
    decide_batch,
    estimate_cost,
    fail_assessment,
    index_pass,
    load_for_assessment,
    outcome_of,
    store_assessment,
)
from shiftcost.pipeline.bootstrap import (
    Bootstrapped,
    ModelVersion,
    bootstrap,
    ensure_default_budget,
    fit_cost_model,
    measure_energy_probe,
    record_energy_probe,
    register_model_version,
)
from shiftcost.pipeline.claims import (
    Claim,
    ClaimLost,
    PendingBatch,
    claim_for_assessment,
    pending_batches,
    release_claim,
    requeue_deferred,
)
from shiftcost.pipeline.common import Artifacts, carbon_intensity, connect, load_cost_model, store_cost_model
from shiftcost.pipeline.intake import ArchiveReport, Registration, archive_processed, discover_batches, register_batch, register_landed
from shiftcost.pipeline.labels import attach_labels, attach_landed_labels
from shiftcost.pipeline.retrain import (
    NewVersion,
    RetrainFailed,
    RetrainInputs,
    RetrainJob,
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
    retrain_outcome_of,
    run_retrain,
)

if TYPE_CHECKING:
    from shiftcost.config import Settings
    from shiftcost.store import Database

__all__ = [
    "ArchiveReport",
    "attach_labels",
    "attach_landed_labels",
    "Artifacts",
    "AssessOutcome",
    "BatchResult",
    "Bootstrapped",
    "Claim",
    "ClaimLost",
    "CostEstimate",
    "DriftCheck",
    "LoadedBatch",
    "ModelVersion",
    "NewVersion",
    "PendingBatch",
    "Registration",
    "RetrainFailed",
    "RetrainInputs",
    "RetrainJob",
    "RetrainOutcome",
    "assess_batch",
    "bootstrap",
    "build_new_version",
    "carbon_intensity",
    "check_drift",
    "claim_for_assessment",
    "claim_retrain",
    "connect",
    "decide_batch",
    "archive_processed",
    "discover_batches",
    "ensure_default_budget",
    "estimate_cost",
    "execute_retrain",
    "fail_assessment",
    "fail_stale_retrains",
    "fit_cost_model",
    "index_pass",
    "load_cost_model",
    "load_for_assessment",
    "load_for_retrain",
    "measure_energy_probe",
    "not_started",
    "outcome_of",
    "pending_batches",
    "process_batch",
    "record_energy_probe",
    "record_retrain_failure",
    "record_retrain_success",
    "refit_cost_model",
    "retrain_outcome_of",
    "register_batch",
    "register_landed",
    "requeue_deferred",
    "register_model_version",
    "release_claim",
    "run_retrain",
    "store_assessment",
    "store_cost_model",
    "watch_once",
]


@dataclass
class BatchResult:
    """One batch through the pipeline: its registration, assessment and retraining."""

    registration: Registration | None
    assessment: AssessOutcome | None
    retraining: RetrainOutcome | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "registration": None if self.registration is None else self.registration.to_dict(),
            "assessment": None if self.assessment is None else self.assessment.to_dict(),
            "retraining": None if self.retraining is None else self.retraining.to_dict(),
        }


@contextmanager
def _database(settings: Settings, db: Database | None) -> Iterator[Database]:
    if db is not None:
        yield db
    else:
        with connect(settings) as opened:
            yield opened


def _continue(db: Database, settings: Settings, registration: Registration | None, batch_id: int, retrain: bool) -> BatchResult:
    assessment = assess_batch(db, settings, batch_id)
    retraining = None
    if retrain and assessment.retrain_pending:
        try:
            retraining = run_retrain(db, settings, batch_id)
        except RetrainFailed as error:
            retraining = error.outcome
    return BatchResult(registration, assessment, retraining)


def process_batch(settings: Settings, uri: str, *, retrain: bool = True, db: Database | None = None) -> BatchResult:
    """Register the batch at ``uri`` and take it through assessment and, if decided, retraining.

    A batch registered before is not processed again: its stored state comes back.
    A failed retraining is recorded (run failed, its measured spend settled) and returned.
    """
    with _database(settings, db) as database:
        registration = register_batch(database, settings, uri)
        if registration.status != "registered":
            return BatchResult(registration, outcome_of(database, registration.batch_id))
        result = _continue(database, settings, registration, registration.batch_id, retrain)
        assessment = result.assessment
        if not retrain and assessment is not None and assessment.retrain_pending and assessment.decision_id is not None:
            # No run follows to settle it: a reservation never outlives its decision. A later
            # `shiftcost retrain` still records its spend (a late settlement).
            from shiftcost.store import ledger

            with database.session() as session:
                ledger.release_decision(session, assessment.decision_id, "assessed without retraining (--no-retrain): no run holds this reservation")
        return result


def watch_once(settings: Settings, *, retrain: bool = True, db: Database | None = None) -> list[BatchResult]:
    """One poll of the landing location: register what is new, close retrain runs whose
    process was killed, give back deferred batches whose retry time has passed, then
    process every pending batch."""
    with _database(settings, db) as database:
        registrations = {}
        for landed in discover_batches(database, settings):
            registration = register_landed(database, settings, landed)
            if registration.entry_state != "duplicate":
                registrations[registration.batch_id] = registration
        fail_stale_retrains(database, settings.model_name, settings.retrain_stale_after_s)
        requeue_deferred(database, settings.model_name)
        attach_landed_labels(database, settings)
        results = [
            _continue(database, settings, registrations.get(pending.batch_id), pending.batch_id, retrain)
            for pending in pending_batches(database, settings.model_name, settings.claim_lease_s)
        ]
        failed = [
            BatchResult(registration, outcome_of(database, batch_id, processed=True))
            for batch_id, registration in registrations.items()
            if registration.created and registration.status == "failed"
        ]
        archive_processed(database, settings)
        return failed + results
