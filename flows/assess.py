"""The assess flow: one forward pass, drift, indices, cost, decision, storage; then retrain."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.handoff import Overrides, batch_key, completed_result, settings_for, start_deployment
from flows.retrain import retrain
from flows.shards import forward_pass
from shiftcost.errors import InputError
from tasks import assess as steps
from tasks import retrain as retrain_steps


@flow(name="assess", persist_result=False, retries=1, retry_delay_seconds=2)
def assess(batch_id: int, overrides: Overrides = None) -> dict[str, Any]:
    """Assess batch ``batch_id`` once and, when the decision is retrain, start retraining."""
    settings = settings_for(overrides)
    claim = steps.claim_batch(settings, batch_id)
    if claim is None:
        return steps.batch_outcome(settings, batch_id).to_dict()
    try:
        loaded = steps.load_batch(settings, claim)
        report = forward_pass(settings, loaded)
        drift = steps.detect_drift(settings, loaded, report)
        estimate = steps.predict_cost(settings, loaded, report, drift)
        outcome = steps.decide_and_store(settings, loaded, report, drift, estimate)
    except InputError as error:  # the batch is at fault: failed with the reason
        outcome = steps.mark_failed(settings, claim, error)
    except BaseException:  # anything else: give the batch back for the retry
        steps.release(settings, claim)
        raise
    result = outcome.to_dict()
    if outcome.retrain_pending:
        if settings.flow_mode == "deployment":
            key = batch_key(settings, outcome.fingerprint or str(batch_id))
            result["retrain_flow_run"] = start_deployment(settings.retrain_deployment, {"batch_id": batch_id, "overrides": overrides}, key)
        else:
            # The retrain subflow's own state tells whether retraining failed; the assessment stands.
            state = retrain(batch_id, overrides, return_state=True)
            if state.is_completed():
                result["retraining"] = completed_result(state, lambda: retrain_steps.stored_outcome(settings, batch_id).to_dict())
            else:
                result["retraining"] = {"flow_state": state.type.value, "message": state.message}
    return result
