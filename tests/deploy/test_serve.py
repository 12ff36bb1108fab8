"""``shiftcost serve`` as a user runs it: one process, Prefect's ephemeral API, a landing folder, Ctrl-C."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flow_support import PipelineEnv, brightened, sqlite_only

from shiftcost.store import models as db

SERVE = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from shiftcost.cli import main; main()"


def start_serve(tmp_path: Path, log_path: Path, *options: str, **environment: str) -> subprocess.Popen[bytes]:
    """``shiftcost serve --interval 1`` in a process group of its own, on a fresh ephemeral API in ``tmp_path``."""
    inherited = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            # As from a terminal, whatever this process inherited: a shell's background job ignores SIGINT.
            [sys.executable, "-c", SERVE, "serve", "--interval", "1", *options],
            cwd=tmp_path, env=inherited | {"PREFECT_HOME": str(tmp_path / "prefect-home")} | environment,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def watch_run_states(prefect_home: Path) -> list[str]:
    """The state of every run of the watch deployment, read from the ephemeral API's own database."""
    with sqlite3.connect(f"file:{prefect_home / 'prefect.db'}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT flow_run.state_type FROM flow_run JOIN deployment ON flow_run.deployment_id = deployment.id "
            "WHERE deployment.name = 'shiftcost-watch'"
        ).fetchall()
    return [state for (state,) in rows]


def tracebacks_other_than_keyboard_interrupt(output: str) -> list[str]:
    """The exception lines of the tracebacks in ``output`` that did not end in KeyboardInterrupt.

    A terminal's Ctrl-C reaches every process of the group: a flow-run process Prefect's runner
    has just started may still be importing, and Python prints that interruption's stack.
    """
    raised = []
    for block in output.split("Traceback (most recent call last):")[1:]:
        exception = next((line for line in block.splitlines()[1:] if line and not line[0].isspace()), "")
        if exception.strip() != "KeyboardInterrupt":
            raised.append(exception)
    return raised


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@sqlite_only
@pytest.mark.slow
def test_serve_retrains_a_landed_batch_queues_no_polls_behind_a_running_watch_and_stops_on_one_ctrl_c(
    pipeline_env: PipelineEnv, tmp_path: Path
) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)
    prefect_home = tmp_path / "prefect-home"
    log_path = tmp_path / "serve.log"
    # A poll every second: the watch that assesses and retrains the batch inline lasts many polls.
    serve = start_serve(tmp_path, log_path)
    try:
        deadline = time.monotonic() + 300
        while serve.poll() is None and time.monotonic() < deadline and env.count(db.RetrainRun, db.RetrainRun.status == "succeeded") == 0:
            time.sleep(1)
        assert env.count(db.RetrainRun, db.RetrainRun.status == "succeeded") == 1, log_path.read_text()[-4000:]
        # Polls go on after the watch that retrained: the runner picks the next one up.
        while serve.poll() is None and time.monotonic() < deadline and watch_run_states(prefect_home).count("COMPLETED") < 2:
            time.sleep(1)
        assert serve.poll() is None, log_path.read_text()[-4000:]
        # The ephemeral API outlives a Ctrl-C until the runner is done with it: without it, the
        # runner retried its last calls for over a minute before it stopped.
        (server,) = [child for child in psutil.Process(serve.pid).children(recursive=True) if "uvicorn" in child.cmdline()]
        server.send_signal(signal.SIGINT)
        time.sleep(2)
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        try:
            returncode = serve.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise
    output = log_path.read_text()
    assert returncode == 0, output[-4000:]
    deadline = time.monotonic() + 10
    while group_alive(serve.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(serve.pid), "the temporary Prefect server outlived `shiftcost serve`"

    (batch,) = env.rows(db.Batch)
    assert batch.status == "done"
    states = watch_run_states(prefect_home)
    assert states.count("COMPLETED") >= 2, states
    # At most the one poll started last may be left waiting; one run queued per poll while the
    # retraining watch ran would leave a dozen.
    assert sum(state in ("SCHEDULED", "PENDING") for state in states) <= 1, states
    assert not tracebacks_other_than_keyboard_interrupt(output), output[-4000:]


@sqlite_only
@pytest.mark.slow
def test_sigterm_to_serve_alone_lets_a_retrain_in_flight_record_that_it_was_stopped_and_settle_what_it_spent(
    pipeline_env: PipelineEnv, tmp_path: Path
) -> None:
    """What ``docker stop`` or ``kill`` does: SIGTERM to the serving process only, during a retrain."""
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    env.drop_unlearnable("unlearnable.npz")
    log_path = tmp_path / "serve.log"
    grace_s = 10
    serve = start_serve(tmp_path, log_path, "--grace-period", str(grace_s), SHIFTCOST_RETRAIN_MAX_EPOCHS="100000")
    try:
        deadline = time.monotonic() + 300
        while serve.poll() is None and time.monotonic() < deadline and env.count(db.RetrainRun) == 0:
            time.sleep(0.1)
        assert env.count(db.RetrainRun) == 1, log_path.read_text()[-4000:]
        serve.send_signal(signal.SIGTERM)
        returncode = serve.wait(timeout=2 * grace_s + 30)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert returncode == 0, output[-4000:]

    # Prefect's runner would have killed the run's process at once: the run stayed `running`
    # and its reservation held until its lease ran out, and what it had spent was never settled.
    env.assert_stopped_retrain_recorded(output[-4000:])
    assert "interrupting 1 flow run(s) still running" in output, output[-4000:]
