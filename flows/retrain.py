"""The retrain flow: retrain a batch decided for retraining, settle, refit, register."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.handoff import Overrides, settings_for
from shiftcost.pipeline import RetrainFailed, connect
from shiftcost.pipeline.lease import heartbeat
from tasks import retrain as steps


@flow(name="retrain", persist_result=False)
def retrain(batch_id: int, overrides: Overrides = None) -> dict[str, Any]:
    """Retrain on batch ``batch_id`` once; a failure is recorded (run failed, its measured spend settled) and fails the flow."""
    settings = settings_for(overrides)
    job = steps.claim_retrain(settings, batch_id)
    if job is None:
        return steps.not_started(settings, batch_id).to_dict()
    result = None
    try:
        # The run proves it is alive for as long as this flow runs its steps.
        with connect(settings) as db, heartbeat(db, job.run_id, settings.retrain_heartbeat_s):
            inputs = steps.load_inputs(settings, job)
            result = steps.retrain_to_cutoff(settings, inputs)
            new_version = steps.build_new_version(settings, inputs, result)
            cost_model, note = steps.refit_cost_model(settings, inputs, result)
            outcome = steps.record_success(settings, inputs, result, new_version, cost_model, note)
    except Exception as error:
        outcome = steps.record_failure(settings, job, error, result)
        raise RetrainFailed(f"Retraining batch {batch_id} failed and was recorded as failed: {outcome.error}", outcome) from error
    return outcome.to_dict()
