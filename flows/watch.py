"""The watch flow: poll the landing location, register batches once, assess what waits."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.handoff import Overrides, settings_for
from flows.runner import PrefectSteps
from shiftcost.pipeline import chain


@flow(name="watch", persist_result=False)
def watch(overrides: Overrides = None) -> list[dict[str, Any]]:
    """One poll: register every new batch, close retrain runs whose process was killed, give
    back deferred batches that are due, assess each waiting batch (failures do not stop the
    others), then move processed landing entries to the archive."""
    return chain.watch(PrefectSteps(settings_for(overrides), overrides)).handed
