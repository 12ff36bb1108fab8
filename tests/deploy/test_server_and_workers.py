"""The documented deployment, for real: ``prefect server start`` on PostgreSQL, the work pools,
``prefect deploy --all``, one process worker per pool, batches through watch → assess → retrain.

Slow (a server, two workers and one Python process per flow run), but it is the only test of
what an operator does; ``.ci/run`` runs it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_support import PipelineEnv, brightened
from prefect_stack import PrefectStack, prefect_database, stack_environment

from shiftcost.store import models as db

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.parametrize("backend", ["postgres"])]


@pytest.fixture
def stack(tmp_path: Path, postgres_admin_url: str) -> Iterator[PrefectStack]:
    """A Prefect server on a database of its own; whatever the test starts is stopped after it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    with prefect_database(postgres_admin_url) as prefect_db:
        stack = PrefectStack(logs, stack_environment(tmp_path / "prefect-home"))
        try:
            stack.start_server(prefect_db)
            yield stack
        finally:
            stack.stop()


def flow_runs(api_url: str) -> dict[str, list]:
    """Every flow run on the server, by flow name."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        names = {flow.id: flow.name for flow in client.read_flows()}
        runs: dict[str, list] = {}
        for run in client.read_flow_runs():
            runs.setdefault(names[run.flow_id], []).append(run)
    return runs


def wait_for(check, timeout: float, stack: PrefectStack, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for name, process in stack.processes.items():
            assert process.poll() is None, f"{name} exited while waiting for {what}:\n{stack.all_logs()}"
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{stack.all_logs()}")


def test_batches_go_watch_assess_retrain_through_a_server_and_workers(pipeline_env: PipelineEnv, stack: PrefectStack) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    clean = env.drop("clean.npz", *env.stream(0, 200))
    x, y = env.stream(200, 400)
    env.drop("shifted.npz", brightened(x), y)
    shutil.copyfile(clean, env.landing / "clean-again.npz")  # the same bytes under another name
    (env.landing / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a whole zip archive")

    for pool in ("cpu", "gpu"):
        stack.run("work-pool", "create", pool, "--type", "process")
    deployed = stack.run("--no-prompt", "deploy", "--all")
    assert "shiftcost-watch" in deployed and "shiftcost-retrain" in deployed
    pools = stack.run("work-pool", "ls")
    assert "cpu" in pools and "gpu" in pools
    for pool in ("cpu", "gpu"):
        stack.start(f"worker-{pool}", "worker", "start", "--pool", pool, "--type", "process")
    stack.run("deployment", "run", "watch/shiftcost-watch")

    def settled() -> bool:
        runs = flow_runs(stack.api_url)
        finished = [run for name in ("assess", "retrain") for run in runs.get(name, [])]
        return len(runs.get("retrain", [])) == 1 and len(runs.get("assess", [])) == 2 and all(run.state.is_final() for run in finished)

    wait_for(settled, 300, stack, "two assess runs and one retrain run to finish")

    runs = flow_runs(stack.api_url)
    assert any(run.state.is_completed() for run in runs["watch"]), stack.all_logs()
    for run in runs["assess"] + runs["retrain"]:
        assert run.state.is_completed(), f"{run.name}: {run.state.type} {run.state.message}\n{stack.all_logs()}"
    by_name = {Path(batch.source_uri).name: batch for batch in env.rows(db.Batch)}
    # The duplicate is one batch with the original, under whichever name was listed first.
    assert len({"clean.npz", "clean-again.npz"} & set(by_name)) == 1
    clean_batch = by_name.get("clean.npz") or by_name["clean-again.npz"]
    shifted, corrupt = by_name["shifted.npz"], by_name["corrupt.npz"]
    assert (clean_batch.status, shifted.status, corrupt.status) == ("done", "done", "failed")
    assert "corrupt.npz is not a readable .npz" in (corrupt.failure_reason or "")
    assert {run.parameters["batch_id"] for run in runs["assess"]} == {clean_batch.id, shifted.id}
    assert runs["retrain"][0].parameters["batch_id"] == shifted.id
    decisions = {decision.batch_id: decision.action for decision in env.rows(db.Decision)}
    assert decisions == {clean_batch.id: "skip", shifted.id: "retrain"}
    (retrain_run,) = env.rows(db.RetrainRun)
    assert (retrain_run.batch_id, retrain_run.status) == (shifted.id, "succeeded")
    assert [entry.kind for entry in env.rows(db.LedgerEntry)] == ["reserve", "settle"]
    assert [model.version for model in env.rows(db.Model)] == [1, 2]
    stack.run("flow-run", "ls")  # the listing the 422 used to break; run() fails on a non-zero exit
