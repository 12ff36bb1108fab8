"""The documented deployment, for real: ``prefect server start`` on PostgreSQL, the work pools,
``prefect deploy --all``, one ``shiftcost worker`` per pool, batches through watch → assess →
retrain, a probe run by the deployed assess on the gpu worker, and a worker stopped mid-retrain.

Slow (a server, two workers and one Python process per flow run), but it is the only test of
what an operator does; ``.ci/run`` runs it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_support import PipelineEnv, bootstrapped_with_probe, brightened
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


def deployment(api_url: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def wait_for(check, timeout: float, stack: PrefectStack, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for name, process in stack.processes.items():
            assert process.poll() is None, f"{name} exited while waiting for {what}:\n{stack.all_logs()}"
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{stack.all_logs()}")


def runs_of(runs: dict[str, list], flow: str, state: str) -> list:
    return [run for run in runs.get(flow, []) if run.state is not None and run.state.type.value == state]


def test_batches_go_watch_assess_retrain_through_a_server_and_workers(
    pipeline_env: PipelineEnv, stack: PrefectStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First without a gpu worker: the assess runs wait, announced, and are cancelled after the
    hand-off timeout; then with one: the batches go through and the rows are in PostgreSQL."""
    env = pipeline_env
    timeout_s = 8
    stack.environment["SHIFTCOST_HANDOFF_TIMEOUT_S"] = str(timeout_s)
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
    (schedule,) = deployment(stack.api_url, "watch/shiftcost-watch").schedules
    assert schedule.active and schedule.schedule.interval.total_seconds() == 60
    stack.start_worker("cpu")

    # No gpu worker: watch hands the two readable batches to assess, whose runs wait.
    stack.run("deployment", "run", "watch/shiftcost-watch")
    wait_for(lambda: len(flow_runs(stack.api_url).get("assess", [])) >= 2, 240, stack, "two assess runs")
    wait_for(lambda: "No worker is polling work pool 'gpu'" in stack.log("worker-cpu", tail=100_000), 60, stack, "the no-worker warning")
    time.sleep(timeout_s)
    stack.run("deployment", "run", "watch/shiftcost-watch")
    wait_for(lambda: len(runs_of(flow_runs(stack.api_url), "assess", "CANCELLED")) >= 2, 240, stack, "the waiting runs to be cancelled")
    cancelled = runs_of(flow_runs(stack.api_url), "assess", "CANCELLED")
    assert all(f"No worker of work pool 'gpu' started this run within {timeout_s} s" in run.state.message for run in cancelled)
    assert {batch.status for batch in env.rows(db.Batch) if batch.status != "failed"} == {"registered"}

    # A gpu worker: the batches are handed off afresh and go through.
    stack.start_worker("gpu")
    stack.run("deployment", "run", "watch/shiftcost-watch")

    def settled() -> bool:
        runs = flow_runs(stack.api_url)
        return len(runs_of(runs, "assess", "COMPLETED")) == 2 and any(run.state.is_final() for run in runs.get("retrain", []))

    wait_for(settled, 420, stack, "two assess runs and one retrain run to finish")

    runs = flow_runs(stack.api_url)
    assert any(run.state.is_completed() for run in runs["watch"]), stack.all_logs()
    (retrain,) = runs["retrain"]
    assert retrain.state.is_completed(), f"{retrain.name}: {retrain.state.type} {retrain.state.message}\n{stack.all_logs()}"
    by_name = {Path(batch.source_uri).name: batch for batch in env.rows(db.Batch)}
    # The duplicate is one batch with the original, under whichever name was listed first.
    assert len({"clean.npz", "clean-again.npz"} & set(by_name)) == 1
    clean_batch = by_name.get("clean.npz") or by_name["clean-again.npz"]
    shifted, corrupt = by_name["shifted.npz"], by_name["corrupt.npz"]
    assert (clean_batch.status, shifted.status, corrupt.status) == ("done", "done", "failed")
    assert "corrupt.npz is not a readable .npz" in (corrupt.failure_reason or "")
    assert {run.parameters["batch_id"] for run in runs_of(runs, "assess", "COMPLETED")} == {clean_batch.id, shifted.id}
    assert retrain.parameters["batch_id"] == shifted.id
    decisions = {decision.batch_id: decision.action for decision in env.rows(db.Decision)}
    assert decisions == {clean_batch.id: "skip", shifted.id: "retrain"}
    (retrain_run,) = env.rows(db.RetrainRun)
    assert (retrain_run.batch_id, retrain_run.status) == (shifted.id, "succeeded")
    assert [entry.kind for entry in env.rows(db.LedgerEntry)] == ["reserve", "settle"]
    assert [model.version for model in env.rows(db.Model)] == [1, 2]
    stack.run("flow-run", "ls")  # the listing the 422 used to break; run() fails on a non-zero exit


@pytest.fixture
def probe_pipeline(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained_model):
    """A pipeline whose cost model has a probe stage, in this test's environment (which the
    ``stack`` fixture, requested after it, hands to the server, the CLI and the workers)."""
    return bootstrapped_with_probe(database_url, tmp_path, monkeypatch, trained_model)


def test_the_probe_runs_on_the_gpu_worker_under_the_share_its_settings_allow(probe_pipeline, stack: PrefectStack, tmp_path: Path) -> None:
    """The deployed assess probes where the probe pays, with the settings the worker was given,
    stores what the probe saw and charges its measured cost to the budget once."""
    import math

    from sqlalchemy import select

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from tests.store import seed

    settings, landing, trained = probe_pipeline
    x, y = trained.splits["stream"]
    # The index forecast of a like batch, assessed here outside the landing area, places a
    # per-run budget inside its interval, where only a probe can tell which side a batch falls.
    elsewhere = tmp_path / "elsewhere"
    first = pipeline.process_batch(settings, str(save_batch(Batch(brightened(x[:200]), y[:200], "first"), elsewhere / "first.npz")), retrain=False)
    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        index = session.get(db.CostPrediction, session.get(db.Decision, first.assessment.decision_id).cost_prediction_id)
        assert index.details["stage"] == "index"
        cap = math.sqrt(index.energy_kwh_lower * index.energy_kwh_upper)
    with pipeline.connect(settings) as database:
        seed.committed(database).create_budget("per-run", period="per_run", kwh_cap=cap)

    stack.environment["SHIFTCOST_PROBE_MAX_SHARE"] = "0.2"  # the workers' setting, named in the decision's reason
    for pool in ("cpu", "gpu"):
        stack.run("work-pool", "create", pool, "--type", "process")
    stack.run("--no-prompt", "deploy", "--all")
    stack.start_worker("cpu")
    stack.start_worker("gpu")
    save_batch(Batch(brightened(x[1:201]), y[1:201], "second"), landing / ".second.partial.npz").rename(landing / "second.npz")
    stack.run("deployment", "run", "watch/shiftcost-watch")
    wait_for(lambda: any(run.state.is_final() for run in flow_runs(stack.api_url).get("assess", [])), 300, stack, "the assess run to finish")

    (assess_run,) = flow_runs(stack.api_url)["assess"]
    assert assess_run.state.is_completed(), f"{assess_run.state.message}\n{stack.all_logs()}"
    assert assess_run.work_pool_name == "gpu"
    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        (batch,) = session.scalars(select(db.Batch).where(db.Batch.source_uri.endswith("second.npz"))).all()
        decision = session.scalars(select(db.Decision).where(db.Decision.batch_id == batch.id)).one()
        prediction = session.get(db.CostPrediction, decision.cost_prediction_id)
        assert prediction.details["stage"] == "probe", prediction.details["probe_advice"]
        assert "straddles" in prediction.details["probe_advice"] and "at most 20% of it" in prediction.details["probe_advice"]
        probe = prediction.details["probe"]
        assert probe["cost"]["steps"] == 2 and probe["cost"]["energy_kwh"] > 0
        charged = session.scalars(
            select(db.LedgerEntry).where(db.LedgerEntry.decision_id == decision.id, db.LedgerEntry.kind == "settle")
        ).all()  # fmt: skip
        assert [entry.energy_kwh for entry in charged if "probe" in (entry.reason or "")] == [pytest.approx(probe["cost"]["energy_kwh"])]


def test_a_worker_stopped_during_a_retrain_lets_it_record_that_it_was_stopped_and_settle_what_it_spent(
    pipeline_env: PipelineEnv, stack: PrefectStack
) -> None:
    """What ``docker stop`` does to a worker: SIGTERM to the worker process alone."""
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    env.drop_unlearnable("unlearnable.npz")
    stack.environment["SHIFTCOST_RETRAIN_MAX_EPOCHS"] = "100000"
    for pool in ("cpu", "gpu"):
        stack.run("work-pool", "create", pool, "--type", "process")
    stack.run("--no-prompt", "deploy", "--all")
    stack.start_worker("cpu")
    grace_s = 10
    gpu = stack.start_worker("gpu", "--grace-period", str(grace_s))
    stack.run("deployment", "run", "watch/shiftcost-watch")
    wait_for(lambda: env.count(db.RetrainRun) == 1, 300, stack, "the retrain run")
    gpu.send_signal(signal.SIGTERM)
    try:
        returncode = gpu.wait(timeout=2 * grace_s + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gpu worker outlived its two grace periods:\n{stack.all_logs()}") from None
    assert returncode == 0, stack.log("worker-gpu")

    # Prefect's process worker would have killed the run's process at once: the run stayed
    # `running` and its reservation held until its lease ran out, its spend never settled.
    env.assert_stopped_retrain_recorded(stack.log("worker-gpu"))
    assert "interrupting 1 flow run(s) still running" in stack.log("worker-gpu", tail=100_000)
