"""Retry policy and shared helpers of the tasks."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

#: Retries of a task that talks to the database or the landing location: 1 s, 2 s, 4 s.
DB_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=1), "retry_jitter_factor": 0.5}


def _transient(error: BaseException) -> bool:
    import httpx
    from sqlalchemy import exc

    from shiftcost.store.errors import BudgetExceededError, DatabaseUnavailableError

    if isinstance(error, (DatabaseUnavailableError, BudgetExceededError, ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    if isinstance(error, exc.DBAPIError):
        return error.connection_invalidated or isinstance(error, (exc.OperationalError, exc.InterfaceError))
    return False


def retry_on_passing_faults(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: an unreachable database or API, a lost race, a network error.

    A user's mistake (a bad batch, a wrong setting) fails the same way every time.
    """
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - inspected, not swallowed
            error = raised
    return error is not None and _transient(error)
