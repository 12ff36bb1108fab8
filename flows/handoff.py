"""Starting the next flow of a batch: inline as a subflow, or as a deployment run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
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


def no_worker_message(run_name: str, pool: str, timeout_s: float | None) -> str:
    """Why a handed-off run waits, and what to do: no worker of its pool is online."""
    until = f"; it is cancelled if none starts it within {timeout_s:g} s (SHIFTCOST_HANDOFF_TIMEOUT_S)" if timeout_s else ""
    return (
        f"No worker is polling work pool '{pool}': flow run '{run_name}' waits for one{until}. "
        f"Start one with: shiftcost worker --pool {pool}"
    )


@task(name="start-deployment", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def start_deployment(
    name: str, parameters: dict[str, Any], idempotency_key: str, timeout_s: float | None = None, earlier_keys: Sequence[str] = ()
) -> str:
    """Create a run of deployment ``name`` once per key (a retry finds the same run); its id.

    A run under one of ``earlier_keys`` that has not finished is returned instead: a new
    attempt is made only once the earlier one is over (cancelled for want of a worker).
    A run created now in a pool without an online worker is announced once, with the remedy.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    if earlier_keys:
        with get_client(sync_client=True) as client:
            earlier = client.read_flow_runs(flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=list(earlier_keys))))
        unfinished = [run for run in earlier if run.state is not None and not run.state.is_final()]
        if unfinished:
            return str(unfinished[0].id)
    asked_at = datetime.now(UTC)
    run = run_deployment(name, parameters=parameters, idempotency_key=idempotency_key, timeout=0)
    logger = get_run_logger()
    logger.info("started %s as flow run %s (key %s)", name, run.id, idempotency_key)
    created_now = run.created is not None and run.created >= asked_at - timedelta(seconds=5)
    if created_now and run.work_pool_name and run.state is not None and run.state.is_scheduled():
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool(run.work_pool_name)
        if pool.status is not None and pool.status.value != "READY":
            logger.warning(no_worker_message(run.name, run.work_pool_name, timeout_s))
    return str(run.id)


def handoff_attempt(updated_at: datetime, timeout_s: float, now: datetime | None = None) -> int:
    """Which hand-off of a waiting batch is due: one more per ``timeout_s`` the batch has waited.

    It is part of the run's idempotency key, so a run cancelled for want of a worker is
    followed by a new one instead of being found again under the same key (and while an
    earlier attempt is still unfinished, ``start_deployment`` returns that one instead).
    """
    now = datetime.now(UTC) if now is None else now
    return max(0, int((now - updated_at).total_seconds() // timeout_s))


@task(name="cancel-unstarted-runs", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def cancel_unstarted_runs(deployment_name: str, timeout_s: float) -> list[str]:
    """Cancel the runs of ``deployment_name`` that no worker started within ``timeout_s``; their ids.

    Only runs still scheduled (late included) are touched: one a worker has taken is left alone.
    """
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled

    logger = get_run_logger()
    cutoff = datetime.now(UTC) - timedelta(seconds=timeout_s)
    cancelled: list[str] = []
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            logger.warning("deployment %s does not exist: nothing to time out (run `prefect deploy --all`)", deployment_name)
            return cancelled
        waiting = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=cutoff),
            ),
        )
        for run in waiting:
            pool = run.work_pool_name or deployment.work_pool_name or "?"
            message = (
                f"No worker of work pool '{pool}' started this run within {timeout_s:g} s, so it was cancelled "
                f"instead of waiting forever; start one with: shiftcost worker --pool {pool}"
            )
            result = client.set_flow_run_state(run.id, Cancelled(message=message))
            if result.status == SetStateStatus.ACCEPT:
                logger.error("flow run '%s' of %s: %s", run.name, deployment_name, message)
                cancelled.append(str(run.id))
    return cancelled


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
