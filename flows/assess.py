"""The assess flow: one forward pass, drift, indices, cost, decision, storage; then retrain."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.handoff import Overrides, settings_for
from flows.runner import PrefectSteps
from shiftcost.pipeline import chain


@flow(name="assess", persist_result=False, retries=1, retry_delay_seconds=2)
def assess(batch_id: int, overrides: Overrides = None) -> dict[str, Any]:
    """Assess batch ``batch_id`` once and, when the decision is retrain, start retraining."""
    outcome, handed_on = chain.assess(PrefectSteps(settings_for(overrides), overrides), batch_id)
    return outcome.to_dict() | (handed_on or {})
