"""The three deployments, as ``prefect.yaml`` declares them and as ``shiftcost serve`` runs them.

Production: ``prefect deploy --all`` reads ``prefect.yaml``; the Prefect server schedules
``watch`` and workers on the ``cpu`` and ``gpu`` work pools run the flows (see
docker/compose.yaml). Embedded: ``shiftcost serve`` builds the same deployments here and
serves them from one process with a Prefect ``Runner``, on Prefect's ephemeral API (SQLite,
no server to install) unless ``PREFECT_API_URL`` names a server. The ephemeral API runs no
scheduler service, so the watch schedule is kept by a ticker thread beside the runner:
every poll interval it starts a ``watch`` run of the served deployment (unless its last one
has not finished), keyed by the interval's slot so that two tickers never start the same poll
twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil

from shiftcost.config import Settings
from shiftcost.redaction import redact_url


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: its flow (by module path), name, work pool and schedule."""

    flow_name: str
    name: str
    module: str
    function: str
    work_pool: str
    scheduled: bool
    description: str

    @property
    def full_name(self) -> str:
        """``flow-name/deployment-name``, as ``run_deployment`` takes it."""
        return f"{self.flow_name}/{self.name}"

    @property
    def entrypoint(self) -> str:
        """The ``prefect.yaml`` entrypoint: file path and flow function."""
        return f"{self.module.replace('.', '/')}.py:{self.function}"


DEPLOYMENTS = (
    DeploymentSpec("watch", "shiftcost-watch", "flows.watch", "watch", "cpu", True, "Poll the landing location and register new batches."),
    DeploymentSpec("assess", "shiftcost-assess", "flows.assess", "assess", "gpu", False, "Assess one batch: drift, indices, cost, decision."),
    DeploymentSpec("retrain", "shiftcost-retrain", "flows.retrain", "retrain", "gpu", False, "Retrain on one batch, settle the budget, learn."),
)


#: Names the project folder for the pull step; by default it is the folder holding the installed ``flows``.
PROJECT_HOME_VARIABLE = "SHIFTCOST_HOME"


def enter_project_directory() -> dict[str, str]:
    """The pull step of ``prefect.yaml``: work in the project folder, where the entrypoints are.

    That folder is ``$SHIFTCOST_HOME`` when set, else the one this ``flows`` package was
    imported from: the checkout of an editable install, ``site-packages`` of a regular one
    (the Docker image), both of which hold ``flows/<name>.py``. So the same deployments run
    from a plain checkout and from the image, with no path written at deploy time.
    """
    configured = os.environ.get(PROJECT_HOME_VARIABLE)
    home = Path(configured).expanduser() if configured else Path(__file__).resolve().parents[1]
    missing = [spec.entrypoint.split(":")[0] for spec in DEPLOYMENTS if not (home / spec.entrypoint.split(":")[0]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The project folder {home} (from {PROJECT_HOME_VARIABLE if configured else 'the installed flows package'}) "
            f"has no {', '.join(missing)}; set {PROJECT_HOME_VARIABLE} to the shiftcost checkout on this worker."
        )
    os.chdir(home)
    return {"directory": str(home)}


def _flow(spec: DeploymentSpec) -> Any:
    import importlib

    return getattr(importlib.import_module(spec.module), spec.function)


def served_deployments(settings: Settings, overrides: dict[str, Any] | None = None, *, scheduled: bool = True) -> list[Any]:
    """The deployments ``shiftcost serve`` runs: watch every ``poll_interval_s`` (when ``scheduled``), the others on demand."""
    from prefect.deployments.runner import EntrypointType

    deployments = []
    for spec in DEPLOYMENTS:
        interval = timedelta(seconds=settings.poll_interval_s) if spec.scheduled and scheduled else None
        deployments.append(
            _flow(spec).to_deployment(
                spec.name,
                interval=interval,
                # One poll at a time; overlapping polls would be safe (the database guards
                # every batch) but wasteful.
                concurrency_limit=1 if spec.scheduled else None,
                parameters={"overrides": overrides} if overrides else None,
                description=spec.description,
                tags=["shiftcost", spec.work_pool],
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def _tick(interval_s: float, stop: threading.Event, log: Any) -> None:
    """Start a watch run every ``interval_s`` seconds until ``stop`` is set.

    A poll is skipped while the watch run this ticker started last has not finished: that run
    will see whatever lands meanwhile, and a run started behind it would only wait for the
    deployment's one slot. Without the skip, a watch that outlasts the interval (an inline
    retrain) left one more run queued every interval, each then run in turn.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    watch = next(spec for spec in DEPLOYMENTS if spec.scheduled)
    previous = None
    told = None
    while not stop.is_set():
        slot = int(time.time() // interval_s)
        try:
            if previous is not None and not _finished(previous.id):
                if told != previous.id:
                    log(f"poll {slot}: watch run {previous.name} has not finished; later polls wait for it")
                    told = previous.id
            else:
                previous = run_deployment(watch.full_name, timeout=0, as_subflow=False, idempotency_key=f"tick-{slot}")
                log(f"poll {slot}: watch run {previous.name} scheduled")
        except ObjectNotFound:
            stop.wait(1.0)  # the runner has not registered the deployments yet
            continue
        except Exception as error:  # noqa: BLE001 - a failed tick must not end the serving
            log(f"poll {slot}: could not start a watch run ({error}); trying again next poll")
        stop.wait(max(0.0, (slot + 1) * interval_s - time.time()))


def _finished(flow_run_id: Any) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state is not None and state.is_final()


def check_prefect_api(url: str, timeout_s: float = 5.0, *, embedded: bool = True) -> None:
    """Fail with one sentence when no Prefect server answers at ``url`` (``PREFECT_API_URL``)."""
    import httpx

    from shiftcost.errors import ConfigError

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
        problem = None if response.status_code == 200 else f"it answered HTTP {response.status_code} to /health"
    except httpx.HTTPError as error:
        problem = str(error) or type(error).__name__
    if problem is not None:
        hint = "; the URL of a server's API ends in /api" if not url.rstrip("/").endswith("/api") else ""
        raise ConfigError(
            f"PREFECT_API_URL is {url}, but no Prefect server answers there ({problem}){hint}: start one with "
            "`prefect server start`" + (", fix the variable, or unset it to run on an embedded API." if embedded else " or fix the variable.")
        )


@contextmanager
def prefect_api(startup_timeout_s: int = 180) -> Iterator[str]:
    """The Prefect API to use: ``PREFECT_API_URL`` when set, else Prefect's ephemeral server.

    The ephemeral server (Prefect's own API on SQLite in ``PREFECT_HOME``) is started here,
    once, and its URL exported, so that the flow runs ``serve`` starts in subprocesses
    report to it instead of each starting a server of their own.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        check_prefect_api(configured)
        yield configured
        return
    server = SubprocessASGIServer()
    # Ctrl-C reaches the terminal's whole process group. A server that died with it left the
    # runner retrying its last API calls for over a minute before it stopped (74 s measured), so
    # the server starts with SIGINT blocked, a mask its process keeps; `stop()` ends it with
    # SIGTERM once the runner is done.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start(timeout=startup_timeout_s)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        server.stop()


def serve(settings: Settings, *, grace_s: float, overrides: dict[str, Any] | None = None, limit: int | None = None) -> None:
    """Serve the three deployments from this process, polling every ``poll_interval_s``, until interrupted.

    Ctrl-C or SIGTERM stops it once the flow runs in flight have ended, or have recorded how
    they ended within ``grace_s`` seconds of being interrupted (see :class:`GracefulShutdown`);
    a second one stops it at once.
    """
    from prefect.logging import get_logger
    from prefect.runner import Runner

    logger = get_logger("shiftcost.serve")

    class GracefulRunner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:  # installed by its start(), over ours
            shutdown(signal.SIGTERM)

    with prefect_api() as url:
        logger.info("Prefect API at %s", redact_url(url))
        runner = GracefulRunner(pause_on_shutdown=True, limit=limit)
        for deployment in served_deployments(settings, overrides, scheduled=False):
            runner.add_deployment(deployment)
        stop = threading.Event()
        ticker = threading.Thread(target=_tick, args=(settings.poll_interval_s, stop, logger.info), name="shiftcost-ticker", daemon=True)
        shutdown = GracefulShutdown(stop, grace_s, logger.info)
        ticker.start()
        try:
            shutdown.run(runner.start)
        finally:
            stop.set()
            ticker.join(timeout=10)


class GracefulShutdown:
    """The first Ctrl-C or SIGTERM of ``serve`` or ``worker``: no new runs, those in flight end, then stop.

    Prefect's runner (a process worker's too) stops by killing its flow-run processes at once
    (SIGKILL), so a retrain in flight could not record that it was stopped: its run stayed
    ``running``, its reservation held and what it had spent unsettled until its lease ran out.
    Here the flow runs get ``grace_s`` seconds to end (a terminal's Ctrl-C has reached them too,
    and they record that they were interrupted; a signal sent to this process alone lets them
    finish), then those still running get a Ctrl-C of their own and ``grace_s`` more to record
    how they ended. The signal is not sent at once since one that reached them already would
    interrupt that record. The event loop waits meanwhile, so that no new run starts.
    """

    def __init__(self, stopping: threading.Event, grace_s: float, log: Any) -> None:
        self.stopping, self.grace_s, self.log = stopping, grace_s, log
        self.main_task: Any = None
        # The processes started before the runner (the ephemeral API) are not flow runs.
        self.not_flow_runs = {child.pid for child in psutil.Process().children()}

    def __call__(self, signum: int, frame: Any = None) -> None:
        if self.stopping.is_set() or self.main_task is None:
            raise KeyboardInterrupt  # a second one, or before the runner started: stop now
        self.stopping.set()
        runs = [child for child in psutil.Process().children() if child.pid not in self.not_flow_runs]
        if runs:
            self.log(f"{signal.Signals(signum).name}: no new runs; waiting up to {self.grace_s:g} s for {len(runs)} flow run(s) to end (Ctrl-C again stops now)")
        if running := self._wait(runs):
            self.log(f"interrupting {len(running)} flow run(s) still running; waiting up to {self.grace_s:g} s for them to record it")
            for run in running:
                try:
                    run.send_signal(signal.SIGINT)
                except psutil.NoSuchProcess:
                    continue
            self._wait(running)
        # As asyncio's own Ctrl-C does: the runner's shutdown runs in its cancelled task.
        self.main_task.get_loop().call_soon_threadsafe(self.main_task.cancel)

    def run(self, start: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``start()`` in an event loop of its own until Ctrl-C or SIGTERM stops it."""
        import asyncio

        async def until_stopped() -> None:
            self.main_task = asyncio.current_task()
            await start()

        # Installed before the event loop starts, so that asyncio keeps its own SIGINT handler out.
        previous = {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            asyncio.run(until_stopped())
        except (KeyboardInterrupt, asyncio.CancelledError):
            self.log("stopped")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wait(self, runs: list[psutil.Process]) -> list[psutil.Process]:
        """Wait up to ``grace_s`` for ``runs`` to end; those still running.

        Polled, not waited for: the event loop's child watcher reaps them and reads their exit codes.
        """
        deadline = time.monotonic() + self.grace_s
        while (running := [run for run in runs if _alive(run)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return running


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
