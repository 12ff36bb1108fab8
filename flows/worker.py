"""``shiftcost worker``: Prefect's process worker for one work pool, stopped gracefully.

The same worker as ``prefect worker start --type process``, whose runs are processes of this
one; only its Ctrl-C and SIGTERM differ (:class:`flows.deployments.GracefulShutdown`): a
container's stop no longer kills a retrain in flight before it can record what it spent.
"""

from __future__ import annotations

import threading

from flows.deployments import GracefulShutdown, check_prefect_api


def work(pool: str, *, grace_s: float, limit: int | None = None, name: str | None = None) -> None:
    """Run the flow runs of work pool ``pool`` until Ctrl-C or SIGTERM."""
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    from shiftcost.errors import ConfigError

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise ConfigError("PREFECT_API_URL is not set: a worker takes its runs from a Prefect server; set it to that server's API URL.")
    check_prefect_api(api_url, embedded=False)
    logger = get_logger("shiftcost.worker")
    GracefulShutdown(threading.Event(), grace_s, logger.info).run(ProcessWorker(work_pool_name=pool, limit=limit, name=name).start)
