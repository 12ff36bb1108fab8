"""The pipeline's steps as plain functions: register, assess, decide, retrain, learn.

The order of the steps is written once, in :mod:`shiftcost.pipeline.chain` (the watch,
assess and retrain chains), and run by a step runner: :class:`PlainSteps` calls each step
here directly (``watch_once``, ``process_batch``, ``assess_batch``, ``run_retrain``); the
Prefect flows in ``flows/`` pass one that wraps each step in its task in ``tasks/``
(retries, timeouts, logging). Nothing here imports Prefect, so the same chains run from
the command line (``shiftcost assess PATH``), from tests and from notebooks.

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

from shiftcost.pipeline.assess import (
    AssessOutcome,
    CostEstimate,
    DriftCheck,
    LoadedBatch,
    check_drift,
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
    attach_cost_model,
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
from shiftcost.pipeline.decide import decide_batch, status_after
from shiftcost.pipeline.common import Artifacts, carbon_intensity, connect, load_cost_model, store_cost_model
from shiftcost.pipeline.intake import ArchiveReport, Registration, archive_processed, discover_batches, register_batch, register_landed
from shiftcost.pipeline.labels import attach_labels, attach_landed_labels
from shiftcost.pipeline.plain import BatchResult, PlainSteps, assess_batch, process_batch, run_retrain, watch_once
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
)

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
    "PlainSteps",
    "Registration",
    "RetrainFailed",
    "RetrainInputs",
    "RetrainJob",
    "RetrainOutcome",
    "assess_batch",
    "attach_cost_model",
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
    "status_after",
    "store_assessment",
    "store_cost_model",
    "watch_once",
]
