"""The step runner of the flows: each step of ``shiftcost.pipeline.chain`` as its Prefect task.

The chains (what happens to a batch, in which order, and what a failure does) are the
library's; this runner only says how a step runs here (its task: retries, timeouts, logs,
the ``gpu`` tag) and how a batch goes to the next flow: a subflow in embedded mode, a run
of the deployment (keyed by the batch, so a retry never starts it twice) in deployment mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingResult

from flows.handoff import Overrides, batch_key, cancel_unstarted_runs, completed_result, handoff_attempt, start_deployment
from flows.shards import forward_pass
from shiftcost import pipeline
from shiftcost.config import Settings
from shiftcost.costmodel import CostModel
from shiftcost.index.engine import IndexReport
from shiftcost.landing import LandedBatch
from shiftcost.redaction import redact_text, redact_url
from shiftcost.retrain import RetrainResult
from tasks import assess as assess_tasks
from tasks import intake
from tasks import retrain as retrain_tasks


class PrefectSteps:
    """Runs every step of the chains as its Prefect task, with this run's settings."""

    def __init__(self, settings: Settings, overrides: Overrides = None) -> None:
        self.settings, self.overrides = settings, overrides

    # ------------------------------------------------------------------ watch

    def discover(self) -> list[LandedBatch]:
        return intake.discover_batches(self.settings)

    def register(self, landed: LandedBatch) -> pipeline.Registration | None:
        state = intake.register_batch(self.settings, landed, return_state=True)
        if not state.is_completed():
            get_run_logger().error("could not register %s: %s", redact_url(landed.uri), redact_text(state.message or ""))
            return None
        try:
            return state.result()
        except MissingResult:  # registered all the same; only this poll's summary misses it
            return None

    def fail_stale_retrains(self) -> list[int]:
        return intake.fail_stale_retrains(self.settings)

    def requeue_deferred(self) -> list[int]:
        return intake.requeue_deferred(self.settings)

    def before_handoffs(self) -> None:
        if self.settings.flow_mode == "deployment":
            cancel_unstarted_runs(self.settings.assess_deployment, self.settings.handoff_timeout_s)

    def attach_landed_labels(self) -> list[int]:
        return intake.attach_landed_labels(self.settings)

    def pending_batches(self) -> list[pipeline.PendingBatch]:
        return intake.pending_batches(self.settings)

    def hand_to_assess(self, pending: pipeline.PendingBatch, registration: pipeline.Registration | None) -> dict[str, Any]:
        settings = self.settings
        if settings.flow_mode == "deployment":
            # Keyed by the batch's state too: a batch given back after a crash gets a new run,
            # and so does one whose last run no worker started in time (cancelled before).
            waiting = f"{batch_key(settings, pending.fingerprint)}:{pending.updated_at.isoformat()}"
            keys = [f"{waiting}:{n}" for n in range(handoff_attempt(pending.updated_at, settings.handoff_timeout_s) + 1)]
            parameters = {"batch_id": pending.batch_id, "overrides": self.overrides}
            run_id = start_deployment(settings.assess_deployment, parameters, keys[-1], settings.handoff_timeout_s, keys[:-1])
            return {"batch_id": pending.batch_id, "assess_flow_run": run_id}
        from flows.assess import assess

        state = assess(pending.batch_id, self.overrides, return_state=True)
        run_id = str(state.state_details.flow_run_id)
        if state.is_completed():
            outcome = completed_result(state, lambda: assess_tasks.batch_outcome(settings, pending.batch_id).to_dict())
            return outcome | {"assess_flow_run": run_id}
        get_run_logger().error("assessing batch %d failed: %s", pending.batch_id, state.message)
        return {"batch_id": pending.batch_id, "assess_flow_run": run_id, "flow_state": state.type.value, "message": state.message}

    def archive_processed(self) -> None:
        archived = intake.archive_processed(self.settings, return_state=True)
        if not archived.is_completed():
            get_run_logger().error("could not archive processed landing entries: %s", archived.message)

    # ------------------------------------------------------------------ assess

    def claim_batch(self, batch_id: int) -> pipeline.Claim | None:
        return assess_tasks.claim_batch(self.settings, batch_id)

    def batch_outcome(self, batch_id: int) -> pipeline.AssessOutcome:
        return assess_tasks.batch_outcome(self.settings, batch_id)

    def load_for_assessment(self, claim: pipeline.Claim) -> pipeline.LoadedBatch:
        return assess_tasks.load_for_assessment(self.settings, claim)

    def forward_pass(self, loaded: pipeline.LoadedBatch) -> IndexReport:
        return forward_pass(self.settings, loaded)  # sharded on Dask when the batch is large

    def detect_drift(self, loaded: pipeline.LoadedBatch, report: IndexReport) -> pipeline.DriftCheck:
        return assess_tasks.detect_drift(self.settings, loaded, report)

    def predict_cost(self, loaded: pipeline.LoadedBatch, report: IndexReport, drift: pipeline.DriftCheck) -> pipeline.CostEstimate | None:
        return assess_tasks.predict_cost(self.settings, loaded, report, drift)

    def decide_and_store(
        self, loaded: pipeline.LoadedBatch, report: IndexReport, drift: pipeline.DriftCheck, estimate: pipeline.CostEstimate | None
    ) -> pipeline.AssessOutcome:
        return assess_tasks.decide_and_store(self.settings, loaded, report, drift, estimate)

    def mark_failed(self, claim: pipeline.Claim, error: BaseException) -> pipeline.AssessOutcome:
        return assess_tasks.mark_failed(self.settings, claim, error)

    def release(self, claim: pipeline.Claim) -> bool:
        return assess_tasks.release(self.settings, claim)

    def hand_to_retrain(self, outcome: pipeline.AssessOutcome) -> dict[str, Any]:
        settings, batch_id = self.settings, outcome.batch_id
        if settings.flow_mode == "deployment":
            key = batch_key(settings, outcome.fingerprint or str(batch_id))
            return {"retrain_flow_run": start_deployment(settings.retrain_deployment, {"batch_id": batch_id, "overrides": self.overrides}, key)}
        from flows.retrain import retrain

        # The retrain subflow's own state tells whether retraining failed; the assessment stands.
        state = retrain(batch_id, self.overrides, return_state=True)
        if state.is_completed():
            return {"retraining": completed_result(state, lambda: retrain_tasks.stored_outcome(settings, batch_id).to_dict())}
        return {"retraining": {"flow_state": state.type.value, "message": state.message}}

    # ------------------------------------------------------------------ retrain

    def claim_retrain(self, batch_id: int) -> pipeline.RetrainJob | None:
        return retrain_tasks.claim_retrain(self.settings, batch_id)

    def not_started(self, batch_id: int) -> pipeline.RetrainOutcome:
        return retrain_tasks.not_started(self.settings, batch_id)

    @contextmanager
    def heartbeat(self, job: pipeline.RetrainJob) -> Iterator[None]:
        """The run proves it is alive for as long as the flow runs its steps."""
        from shiftcost.pipeline.lease import heartbeat

        with pipeline.connect(self.settings) as db, heartbeat(db, job.run_id, self.settings.retrain_heartbeat_s):
            yield

    def load_inputs(self, job: pipeline.RetrainJob) -> pipeline.RetrainInputs:
        return retrain_tasks.load_inputs(self.settings, job)

    def retrain_to_cutoff(self, inputs: pipeline.RetrainInputs) -> RetrainResult:
        return retrain_tasks.retrain_to_cutoff(self.settings, inputs)

    def build_new_version(self, inputs: pipeline.RetrainInputs, result: RetrainResult) -> pipeline.NewVersion | None:
        return retrain_tasks.build_new_version(self.settings, inputs, result)

    def refit_cost_model(self, inputs: pipeline.RetrainInputs, result: RetrainResult) -> tuple[CostModel | None, str | None]:
        return retrain_tasks.refit_cost_model(self.settings, inputs, result)

    def record_success(
        self,
        inputs: pipeline.RetrainInputs,
        result: RetrainResult,
        new_version: pipeline.NewVersion | None,
        cost_model: CostModel | None,
        note: str | None,
    ) -> pipeline.RetrainOutcome:
        return retrain_tasks.record_success(self.settings, inputs, result, new_version, cost_model, note)

    def record_failure(self, job: pipeline.RetrainJob, error: BaseException, measured: RetrainResult | None) -> pipeline.RetrainOutcome:
        return retrain_tasks.record_failure(self.settings, job, error, measured)
