"""A Prefect server on a PostgreSQL database of its own, work pools and process workers.

Everything is started as a child process in a session of its own, so that stopping it ends
the process and all it started (flow-run subprocesses included), and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def shiftcost_command(*args: str) -> list[str]:
    """The ``shiftcost`` command line, as the console script's entry point runs it."""
    return [sys.executable, "-c", "from shiftcost.cli import main; main()", *args]


@contextmanager
def prefect_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for Prefect's own state; yields its asyncpg URL, drops it after."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"shiftcost_prefect_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = make_url(admin_url).set(drivername="postgresql+asyncpg", database=name, query={})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@dataclass
class PrefectStack:
    """The processes started for one test, with their logs; ``stop`` ends them all."""

    logs: Path
    environment: dict[str, str]
    api_url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``prefect *args`` as process ``name``."""
        return self.start_command(name, prefect_command(*args))

    def start_worker(self, pool: str, *options: str) -> subprocess.Popen[bytes]:
        """``shiftcost worker --pool pool``, as docker/compose.yaml starts it, as process ``worker-{pool}``."""
        return self.start_command(f"worker-{pool}", shiftcost_command("worker", "--pool", pool, *options))

    def start_command(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command, cwd=ROOT, env=self.environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[name] = process
        return process

    def run(self, *args: str, timeout: float = 180) -> str:
        """Run a ``prefect`` command to completion; its output, or an assertion error with it."""
        done = subprocess.run(
            prefect_command(*args), cwd=ROOT, env=self.environment, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def start_server(self, database_url: str, timeout: float = 150) -> str:
        port = free_loopback_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.environment |= {"PREFECT_API_DATABASE_CONNECTION_URL": database_url}
        server = self.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, f"the Prefect server exited:\n{self.log('server')}"
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"the Prefect server did not answer within {timeout} s:\n{self.log('server')}")
        self.environment["PREFECT_API_URL"] = self.api_url
        self.environment.pop("PREFECT_API_DATABASE_CONNECTION_URL")  # only the server needs it
        return self.api_url

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    def all_logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)}" for name in self.processes)

    def stop(self) -> None:
        """End every process started here with its whole session: SIGTERM, then SIGKILL."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the session may outlive its leader
            except ProcessLookupError:
                pass
            process.wait()


def stack_environment(prefect_home: Path) -> dict[str, str]:
    """The environment of the server, the CLI and the workers: this test's, plus Prefect's settings."""
    environment = dict(os.environ)
    for key in [key for key in environment if key.startswith("PREFECT_") and key.endswith(("_URL", "_KEY"))]:
        del environment[key]  # no ambient server or profile is used
    python_path = [str(ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment |= {
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(python_path)),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_PROFILES_PATH": str(prefect_home / "profiles.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # Workers look for work every 2 s instead of 10 s: the test waits less.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "SHIFTCOST_FLOW_MODE": "deployment",
        # The test starts each watch run itself; scheduled polls every minute would only
        # compete for the two cores (the schedule itself is checked on the deployment).
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    return environment
