"""The retrain flow: retrain a batch decided for retraining, settle, refit, register."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.handoff import Overrides, settings_for
from flows.runner import PrefectSteps
from shiftcost.pipeline import chain


@flow(name="retrain", persist_result=False)
def retrain(batch_id: int, overrides: Overrides = None) -> dict[str, Any]:
    """Retrain on batch ``batch_id`` once; a failure is recorded (run failed, its measured spend settled) and fails the flow."""
    return chain.retrain(PrefectSteps(settings_for(overrides), overrides), batch_id).to_dict()
