"""Tasks of the assessment: claim, load, one forward pass, drift, cost, decide and store."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shiftcost import pipeline
from shiftcost.config import Settings
from shiftcost.index.engine import IndexReport
from tasks.common import DB_RETRIES, retry_on_passing_faults

_DB = {"cache_policy": NO_CACHE, "retry_condition_fn": retry_on_passing_faults, **DB_RETRIES}


@task(name="claim-batch", timeout_seconds=120, **_DB)
def claim_batch(settings: Settings, batch_id: int) -> pipeline.Claim | None:
    """Claim a batch for assessment; None when another run has it or had it."""
    with pipeline.connect(settings) as db:
        claim = pipeline.claim_for_assessment(db, batch_id, settings.claim_lease_s)
    if claim is None:
        get_run_logger().info("batch %d is not waiting for assessment; nothing to do", batch_id)
    return claim


@task(name="batch-outcome", timeout_seconds=120, **_DB)
def batch_outcome(settings: Settings, batch_id: int) -> pipeline.AssessOutcome:
    """The stored state of a batch."""
    with pipeline.connect(settings) as db:
        return pipeline.outcome_of(db, batch_id)


@task(name="load-and-validate-batch", timeout_seconds=1800, **_DB)
def load_for_assessment(settings: Settings, claim: pipeline.Claim) -> pipeline.LoadedBatch:
    """Read the model, its reference stats and the batch; check the batch fits the model."""
    with pipeline.connect(settings) as db:
        loaded = pipeline.load_for_assessment(db, settings, claim)
    get_run_logger().info(
        "batch %d: %d images for %s v%d%s", claim.batch_id, len(loaded.data), loaded.model_name, loaded.model_version,
        " (labels new to the model: task change)" if loaded.new_task else "",
    )  # fmt: skip
    return loaded


@task(name="forward-pass-indices", cache_policy=NO_CACHE, timeout_seconds=3600, tags=["gpu"])
def forward_pass(settings: Settings, loaded: pipeline.LoadedBatch) -> IndexReport:
    """The one forward pass: activations captured, every index computed."""
    report = pipeline.index_pass(settings, loaded)
    get_run_logger().info(
        "batch %d: RESQUE_dist %s, inv_ARI %s, layer shift %s in %.2f s on %s", loaded.batch_id,
        report.resque_dist, report.inv_ari, report.layer_shift, report.seconds, report.device,
    )  # fmt: skip
    return report


@task(name="detect-drift", cache_policy=NO_CACHE, timeout_seconds=1800)
def detect_drift(settings: Settings, loaded: pipeline.LoadedBatch, report: IndexReport) -> pipeline.DriftCheck:
    """Evidently drift tests on the outputs of the same pass; the HTML report is written."""
    drift = pipeline.check_drift(settings, loaded, report)
    get_run_logger().info("batch %d: drift %s (%s); report %s", loaded.batch_id, drift.verdict, drift.result.rule, drift.html_path)
    return drift


@task(name="predict-cost", timeout_seconds=600, **_DB)
def predict_cost(
    settings: Settings, loaded: pipeline.LoadedBatch, report: IndexReport, drift: pipeline.DriftCheck
) -> pipeline.CostEstimate | None:
    """Epochs, kWh and kg CO2e with intervals; None without drift (unless always assessing)."""
    with pipeline.connect(settings) as db:
        estimate = pipeline.estimate_cost(db, settings, loaded, report, drift)
    if estimate is not None and estimate.prediction is not None:
        p = estimate.prediction
        get_run_logger().info("batch %d: predicted %.3g epochs, %.3g kWh (upper %.3g)", loaded.batch_id, p.epochs, p.energy_kwh or 0, p.energy_kwh_upper or 0)
    return estimate


@task(name="decide-and-store", timeout_seconds=300, **_DB)
def decide_and_store(
    settings: Settings,
    loaded: pipeline.LoadedBatch,
    report: IndexReport,
    drift: pipeline.DriftCheck,
    estimate: pipeline.CostEstimate | None,
) -> pipeline.AssessOutcome:
    """Decide under the budgets; store everything and reserve the budget in one transaction."""
    with pipeline.connect(settings) as db:
        outcome = pipeline.store_assessment(db, settings, loaded, report, drift, estimate)
    get_run_logger().info("batch %d: %s", loaded.batch_id, outcome.summary or f"status {outcome.status}")
    return outcome


@task(name="mark-batch-failed", timeout_seconds=120, **_DB)
def mark_failed(settings: Settings, claim: pipeline.Claim, error: BaseException) -> pipeline.AssessOutcome:
    """A batch the model cannot take: failed, with the reason."""
    get_run_logger().warning("batch %d failed: %s", claim.batch_id, error)
    with pipeline.connect(settings) as db:
        return pipeline.fail_assessment(db, claim, error)


@task(name="release-batch", timeout_seconds=120, **_DB)
def release(settings: Settings, claim: pipeline.Claim) -> bool:
    """Give a claimed batch back after a failure a retry may fix."""
    with pipeline.connect(settings) as db:
        return pipeline.release_claim(db, claim)
