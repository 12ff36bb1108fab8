"""The watch, assess and retrain flows on Prefect's test server, a real model and a real database.

Each test drops batches into the landing folder, runs the real ``watch`` flow and checks
what the database holds afterwards: the rows written (or not), the ledger, the model and
cost model versions.
"""

from __future__ import annotations


import pytest
import torch
from flow_support import PipelineEnv, brightened, sqlite_only

from shiftcost import pipeline
from shiftcost.store import models as db

pytestmark = pytest.mark.usefixtures("prefect_server")


def run_watch() -> list[dict]:
    from flows.watch import watch

    return watch()


def only_batch(env: PipelineEnv) -> db.Batch:
    (batch,) = env.rows(db.Batch)
    return batch


def only_decision(env: PipelineEnv) -> db.Decision:
    (decision,) = env.rows(db.Decision)
    return decision


def codes(decision: db.Decision) -> list[str]:
    return [reason["code"] for reason in decision.reasons]


@sqlite_only
def test_a_batch_without_drift_is_skipped_without_computing_costs(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    env.drop("clean.npz", *env.stream(0, 250))

    (result,) = run_watch()

    batch = only_batch(env)
    assert (batch.status, batch.samples, batch.has_labels) == ("done", 250, True)
    decision = only_decision(env)
    assert decision.action == "skip" and codes(decision) == ["no_drift"]
    assert decision.cost_prediction_id is None and env.count(db.CostPrediction) == 0
    assert env.count(db.IndexRun) == 1
    reports = {report.feature_set: report for report in env.rows(db.DriftReport)}
    assert set(reports) == {"embeddings", "image_stats", "predictions", "overall"}
    assert not any(report.drift_detected for report in reports.values())
    html = reports["overall"].html_uri
    assert html and html == result["drift_report"] and "<html" in open(html, encoding="utf-8").read(2000).lower()
    assert reports["embeddings"].threshold is not None and reports["embeddings"].thresholds["verdict"] is False
    assert env.count(db.RetrainRun) == 0 and env.count(db.LedgerEntry) == 0


@sqlite_only
def test_a_drifted_batch_over_budget_is_refused_with_its_reason_and_not_retrained(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    env.budget("tiny", period="per_run", kwh=1e-9)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)

    run_watch()

    decision = only_decision(env)
    assert decision.action == "skip" and decision.blocked_by_budget
    refusal = next(reason for reason in decision.reasons if reason["code"] == "over_budget_cap")
    assert refusal["budget"] == "tiny" and refusal["blocking"]
    assert refusal["numbers"]["kwh_needed"] > refusal["numbers"]["kwh_cap"] == 1e-9
    assert "drift_detected" in codes(decision)
    prediction = env.rows(db.CostPrediction)[0]
    assert decision.cost_prediction_id == prediction.id and prediction.energy_kwh_upper > 1e-9
    assert only_batch(env).status == "done"
    assert env.count(db.RetrainRun) == 0 and env.count(db.LedgerEntry) == 0
    assert [model.version for model in env.rows(db.Model)] == [1]


@sqlite_only
def test_a_drifted_batch_within_budget_is_retrained_settled_and_learned_from(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)

    (result,) = run_watch()
    assert result["action"] == "retrain" and result["retraining"]["status"] == "succeeded"

    (run,) = env.rows(db.RetrainRun)
    decision = only_decision(env)
    assert (run.status, run.reached_cutoff, run.decision_id) == ("succeeded", True, decision.id)
    assert run.energy_kwh > 0 and run.emissions_kg > 0 and run.epochs > 0
    # The ledger: the predicted upper bound reserved, then settled with what CodeCarbon measured.
    reserve, settle = env.rows(db.LedgerEntry)
    prediction = env.rows(db.CostPrediction)[0]
    assert (reserve.kind, settle.kind, settle.reservation_id) == ("reserve", "settle", reserve.id)
    assert reserve.energy_kwh == pytest.approx(prediction.energy_kwh_upper)
    assert (settle.energy_kwh, settle.emissions_kg) == (run.energy_kwh, run.emissions_kg)
    assert env.remaining_kwh("monthly") == pytest.approx(1.0 - run.energy_kwh)
    # The cost model learned from the run: a new calibration version with one more point.
    first, second = env.rows(db.Calibration)
    assert (first.version, first.source, second.version, second.source) == (1, "sweep", 2, "refit")
    assert second.n_points == first.n_points + 1
    learned = second.fit_data["rows"][-1]
    assert learned["epochs"] == pytest.approx(run.epochs) and learned["censored"] is False
    (index_run,) = env.rows(db.IndexRun)
    assert learned["x"]["resque_dist"] == pytest.approx(index_run.resque_dist)
    assert index_run.resque_dist_variant == "labels"  # the batch had labels, so they grouped the classes
    # The new model version, with its own reference stats, replaces the old one for new batches.
    old, new = env.rows(db.Model)
    assert (new.version, new.parent_id, run.new_model_id) == (2, old.id, new.id)
    assert new.fingerprint != old.fingerprint
    assert env.count(db.ReferenceStats, db.ReferenceStats.model_id == new.id) == 1
    assert only_batch(env).status == "done"
    # What the flow returned is what the store says (the flows fall back on it when Prefect loses a result).
    with pipeline.connect(env.settings) as database:
        stored = pipeline.retrain_outcome_of(database, run.batch_id).to_dict()
    returned = result["retraining"]
    assert stored["settled"] == [settle.id] and stored["new_model_version"] == 2
    not_on_the_run = {"calibration_id", "cost_model_version", "notes"}  # the refit's, not the run's
    assert {key: value for key, value in returned.items() if key not in not_on_the_run} == {
        key: value for key, value in stored.items() if key not in not_on_the_run
    }

    # Polling again processes nothing twice.
    assert run_watch() == []
    assert (env.count(db.RetrainRun), env.count(db.LedgerEntry), env.count(db.Decision)) == (1, 2, 1)


@sqlite_only
def test_a_deferred_batch_is_assessed_again_by_the_watcher_once_its_retry_time_has_come(pipeline_env: PipelineEnv) -> None:
    from sqlalchemy import update

    from tests.store import seed

    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    env.drop("clean.npz", *env.stream(0, 250))
    (clean,) = run_watch()
    with pipeline.connect(env.settings) as database:  # the rest of the month is held by another run
        holding = seed.committed(database).reserve("monthly", env.remaining_kwh("monthly") - 1e-12, 0.0, clean["decision_id"])
    x, y = env.stream(250, 450)
    env.drop("bright.npz", brightened(x), y)
    (deferred,) = run_watch()
    assert deferred["action"] == "defer" and deferred["status"] == "assessed"
    assert run_watch() == []  # not due yet

    # The month is over: move its end into the past and release what held it.
    with pipeline.connect(env.settings) as database:
        with database.session() as session:
            session.execute(update(db.Decision).where(db.Decision.id == deferred["decision_id"]).values(retry_after=db.utcnow()))
        seed.committed(database).release(holding, "the period it held is over")
    (again,) = run_watch()

    assert again["batch_id"] == deferred["batch_id"] and again["action"] == "retrain"
    assert again["retraining"]["status"] == "succeeded"
    assert [d.action for d in env.rows(db.Decision, db.Decision.batch_id == deferred["batch_id"])] == ["defer", "retrain"]
    assert run_watch() == []


def test_a_completed_subflow_whose_result_was_lost_is_read_back_from_the_store() -> None:
    from prefect.states import Completed

    from flows.handoff import completed_result

    def from_store() -> dict:
        return {"read": "from the store"}

    assert completed_result(Completed(data={"returned": 1}), from_store) == {"returned": 1}
    assert completed_result(Completed(), from_store) == {"read": "from the store"}  # no data: results are not persisted


def test_the_same_batch_dropped_twice_is_processed_once(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    x, y = env.stream(0, 250)
    env.drop("monday.npz", x, y)
    env.drop("monday-again.npz", x, y)  # the same bytes under another name

    first = run_watch()
    second = run_watch()

    assert len(first) == 1 and second == []
    assert env.count(db.Batch) == 1
    assert (env.count(db.IndexRun), env.count(db.Decision), env.count(db.DriftReport)) == (1, 1, 4)


@sqlite_only
def test_a_flow_retried_after_a_crash_processes_the_batch_once(pipeline_env: PipelineEnv) -> None:
    """The forward pass crashes on the first attempt; Prefect retries the assess flow."""
    from prefect.client.orchestration import get_client

    env = pipeline_env
    env.drop("clean.npz", *env.stream(0, 250))
    crashes = []

    def crash_once(module: torch.nn.Module, args: tuple) -> None:
        if not crashes and not module.training and type(module).__name__ == "DigitsCNN":
            crashes.append(module)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(crash_once)
    try:
        (result,) = run_watch()
    finally:
        handle.remove()

    assert len(crashes) == 1
    assert result["status"] == "done" and result["processed"]
    assert (env.count(db.IndexRun), env.count(db.Decision), env.count(db.DriftReport)) == (1, 1, 4)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(result["assess_flow_run"])
    assert run.run_count == 2 and run.state is not None and run.state.is_completed()  # the crash, then the retry


def test_the_database_going_away_mid_transaction_leaves_nothing_half_written(pipeline_env: PipelineEnv, backend: str, database_url: str) -> None:
    """The connection dies inside the one assessment transaction; the task retries and stores it all once."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)
    seen: list[str] = []
    killed: list[int] = []

    def disconnect_once(conn, cursor, text, parameters, context, executemany) -> None:  # noqa: ANN001
        if text.lstrip().upper().startswith(("INSERT INTO INDEX_RUNS", "INSERT INTO DRIFT_REPORTS")):
            seen.append(text.split()[2])
        if killed or not text.lstrip().upper().startswith("INSERT INTO DECISIONS"):
            return
        killed.append(1)
        if backend == "postgres":
            _terminate_backend(database_url, cursor.connection.info.backend_pid)  # the server drops us for real
        else:
            import sqlite3

            raise sqlite3.OperationalError("disk I/O error")

    event.listen(Engine, "before_cursor_execute", disconnect_once)
    try:
        (result,) = run_watch()
    finally:
        event.remove(Engine, "before_cursor_execute", disconnect_once)

    assert killed == [1]
    # The first attempt had written its index run and drift reports before the connection died ...
    assert seen.count("index_runs") == 2
    # ... and none of it survived: one attempt's rows only, the reservation made once.
    assert (env.count(db.IndexRun), env.count(db.DriftReport), env.count(db.Decision)) == (1, 4, 1)
    assert result["action"] == "retrain" and result["retraining"]["status"] == "succeeded"
    assert [entry.kind for entry in env.rows(db.LedgerEntry)] == ["reserve", "settle"]


def _terminate_backend(database_url: str, pid: int) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(database_url)
    try:
        with admin.begin() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()
