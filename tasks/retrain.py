"""Tasks of retraining: claim, load, retrain (measured), new version, refit, settle or release."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shiftcost import pipeline
from shiftcost.config import Settings
from shiftcost.costmodel import CostModel
from shiftcost.retrain import RetrainResult
from tasks.common import DB_RETRIES, retry_on_passing_faults

_DB = {"cache_policy": NO_CACHE, "retry_condition_fn": retry_on_passing_faults, **DB_RETRIES}


@task(name="claim-retrain", timeout_seconds=120, **_DB)
def claim_retrain(settings: Settings, batch_id: int) -> pipeline.RetrainJob | None:
    """Claim a batch decided for retraining and open its run; None if it is not waiting."""
    with pipeline.connect(settings) as db:
        job = pipeline.claim_retrain(db, batch_id)
    if job is None:
        get_run_logger().info("batch %d is not waiting for retraining; nothing to do", batch_id)
    return job


@task(name="retrain-not-started", timeout_seconds=120, **_DB)
def not_started(settings: Settings, batch_id: int) -> pipeline.RetrainOutcome:
    with pipeline.connect(settings) as db:
        return pipeline.not_started(db, batch_id)


@task(name="retrain-outcome", timeout_seconds=120, **_DB)
def stored_outcome(settings: Settings, batch_id: int) -> pipeline.RetrainOutcome:
    """The stored outcome of the batch's latest retraining run."""
    with pipeline.connect(settings) as db:
        return pipeline.retrain_outcome_of(db, batch_id)


@task(name="load-retrain-inputs", timeout_seconds=1800, **_DB)
def load_inputs(settings: Settings, job: pipeline.RetrainJob) -> pipeline.RetrainInputs:
    """The model, the batch, the reference and the indices the decision used."""
    with pipeline.connect(settings) as db:
        return pipeline.load_for_retrain(db, settings, job)


# Never retried: a crashed run spent energy, and spending more needs a new decision.
@task(name="retrain-to-cutoff", cache_policy=NO_CACHE, timeout_seconds=6 * 3600, tags=["gpu"])
def retrain_to_cutoff(settings: Settings, inputs: pipeline.RetrainInputs) -> RetrainResult:
    """Fine-tune to the cutoff accuracy with CodeCarbon measuring."""
    result = pipeline.execute_retrain(settings, inputs)
    get_run_logger().info(
        "batch %d: %s after %d steps (%.2f epochs), %.3g kWh, %.3g kg CO2e", inputs.job.batch_id, result.status,
        result.steps, result.epochs, result.energy_kwh or 0.0, result.emissions_kg or 0.0,
    )  # fmt: skip
    return result


@task(name="build-new-version", cache_policy=NO_CACHE, timeout_seconds=3600, tags=["gpu"])
def build_new_version(settings: Settings, inputs: pipeline.RetrainInputs, result: RetrainResult) -> pipeline.NewVersion | None:
    """Save the new weights and compute their reference stats."""
    return pipeline.build_new_version(settings, inputs, result)


@task(name="refit-cost-model", timeout_seconds=600, **_DB)
def refit_cost_model(settings: Settings, inputs: pipeline.RetrainInputs, result: RetrainResult) -> tuple[CostModel | None, str | None]:
    """Add the measured run to the cost model's data and fit its next version."""
    with pipeline.connect(settings) as db:
        cost_model, note = pipeline.refit_cost_model(db, inputs, result)
    if note:
        get_run_logger().warning("%s", note)
    return cost_model, note


@task(name="settle-and-register", timeout_seconds=300, **_DB)
def record_success(
    settings: Settings,
    inputs: pipeline.RetrainInputs,
    result: RetrainResult,
    new_version: pipeline.NewVersion | None,
    cost_model: CostModel | None,
    note: str | None,
) -> pipeline.RetrainOutcome:
    """Settle the ledger, register the new model and cost model versions; one transaction."""
    with pipeline.connect(settings) as db:
        outcome = pipeline.record_retrain_success(db, inputs, result, new_version, cost_model, [note] if note else None)
    get_run_logger().info(
        "batch %d: run %d %s; settled %.3g kWh; model version %s; cost model version %s", outcome.batch_id, outcome.run_id,
        outcome.status, outcome.energy_kwh or 0.0, outcome.new_model_version, outcome.cost_model_version,
    )  # fmt: skip
    return outcome


@task(name="record-failure-and-release", timeout_seconds=300, **_DB)
def record_failure(settings: Settings, job: pipeline.RetrainJob, error: BaseException, measured: RetrainResult | None = None) -> pipeline.RetrainOutcome:
    """Mark the run and the batch failed (keeping what it measured) and release the reservation."""
    with pipeline.connect(settings) as db:
        outcome = pipeline.record_retrain_failure(db, job, error, measured)
    closed = "reservation released" if outcome.released else "no reservation was open"
    get_run_logger().error("batch %d: retraining failed (%s); %s", job.batch_id, outcome.error, closed)
    return outcome
