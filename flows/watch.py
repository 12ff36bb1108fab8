"""The watch flow: poll the landing location, register batches once, assess what waits."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.assess import assess
from flows.handoff import Overrides, batch_key, cancel_unstarted_runs, completed_result, handoff_attempt, settings_for, start_deployment
from shiftcost.redaction import redact_text, redact_url
from tasks import assess as assess_steps
from tasks import intake


@flow(name="watch", persist_result=False)
def watch(overrides: Overrides = None) -> list[dict[str, Any]]:
    """One poll: register every new batch, close retrain runs whose process was killed, give
    back deferred batches that are due, assess each waiting batch (failures do not stop the
    others), then move processed landing entries to the archive."""
    settings = settings_for(overrides)
    logger = get_run_logger()
    for landed in intake.discover_batches(settings):
        state = intake.register_batch(settings, landed, return_state=True)
        if not state.is_completed():
            logger.error("could not register %s: %s", redact_url(landed.uri), redact_text(state.message or ""))
    intake.fail_stale_retrains(settings)
    intake.requeue_deferred(settings)
    if settings.flow_mode == "deployment":
        cancel_unstarted_runs(settings.assess_deployment, settings.handoff_timeout_s)
    intake.attach_landed_labels(settings)
    results: list[dict[str, Any]] = []
    for pending in intake.pending_batches(settings):
        if settings.flow_mode == "deployment":
            # Keyed by the batch's state too: a batch given back after a crash gets a new run,
            # and so does one whose last run no worker started in time (cancelled above).
            waiting = f"{batch_key(settings, pending.fingerprint)}:{pending.updated_at.isoformat()}"
            keys = [f"{waiting}:{n}" for n in range(handoff_attempt(pending.updated_at, settings.handoff_timeout_s) + 1)]
            parameters = {"batch_id": pending.batch_id, "overrides": overrides}
            run_id = start_deployment(settings.assess_deployment, parameters, keys[-1], settings.handoff_timeout_s, keys[:-1])
            results.append({"batch_id": pending.batch_id, "assess_flow_run": run_id})
            continue
        state = assess(pending.batch_id, overrides, return_state=True)
        run_id = str(state.state_details.flow_run_id)
        if state.is_completed():
            outcome = completed_result(state, lambda: assess_steps.batch_outcome(settings, pending.batch_id).to_dict())
            results.append(outcome | {"assess_flow_run": run_id})
        else:
            logger.error("assessing batch %d failed: %s", pending.batch_id, state.message)
            results.append({"batch_id": pending.batch_id, "assess_flow_run": run_id, "flow_state": state.type.value, "message": state.message})
    archived = intake.archive_processed(settings, return_state=True)
    if not archived.is_completed():
        logger.error("could not archive processed landing entries: %s", archived.message)
    return results
