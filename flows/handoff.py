"""Starting the next flow of a batch: inline as a subflow, or as a deployment run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import MissingResult
from prefect.states import State

from shiftcost.config import Settings, load_settings
from tasks.common import DB_RETRIES, retry_on_passing_faults

Overrides = dict[str, Any] | None


def settings_for(overrides: Overrides) -> Settings:
    """The settings of this run: environment and files, then the flow's overrides."""
    return load_settings(**(overrides or {}))


@task(name="start-deployment", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def start_deployment(name: str, parameters: dict[str, Any], idempotency_key: str) -> str:
    """Create a run of deployment ``name`` once per key (a retry finds the same run); its id."""
    run = run_deployment(name, parameters=parameters, idempotency_key=idempotency_key, timeout=0)
    get_run_logger().info("started %s as flow run %s (key %s)", name, run.id, idempotency_key)
    return str(run.id)


def batch_key(settings: Settings, fingerprint: str) -> str:
    """The idempotency key of a batch's runs: its model name and content fingerprint."""
    return f"{settings.model_name}:{fingerprint}"


def completed_result(state: State, stored: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The return value of a completed subflow, or its outcome read back from the store.

    Flow results are not persisted, so a final state the engine had to take back from the API
    carries no data: this happens when the API was slow to answer the state update and the
    retried update found the run already completed (seen with Prefect's SQLite API under load).
    The store is the record of what happened in any case.
    """
    try:
        return state.result()
    except MissingResult:
        return stored()
