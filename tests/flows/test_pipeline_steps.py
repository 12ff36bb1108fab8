"""The pipeline steps without Prefect: claims, the cost model store, fsspec landings, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from flow_support import PipelineEnv, brightened, hand_made_calibration, sqlite_only

from shiftcost import pipeline
from shiftcost.store import models as db


@sqlite_only
def test_a_claim_left_by_a_crashed_run_is_taken_over_after_its_lease_and_its_owner_can_write_nothing(
    pipeline_env: PipelineEnv,
) -> None:
    env = pipeline_env
    env.drop("clean.npz", *env.stream(0, 200))
    settings = env.settings.model_copy(update={"claim_lease_s": 0.5})
    with pipeline.connect(settings) as database:
        (landed,) = pipeline.discover_batches(database, settings)
        batch_id = pipeline.register_landed(database, settings, landed).batch_id
        crashed = pipeline.claim_for_assessment(database, batch_id, settings.claim_lease_s)
        assert crashed is not None
        # While the lease runs, nobody else may claim it and it is not pending.
        assert pipeline.claim_for_assessment(database, batch_id, settings.claim_lease_s) is None
        assert pipeline.pending_batches(database, settings.model_name, settings.claim_lease_s) == []
        time.sleep(0.6)
        assert [p.batch_id for p in pipeline.pending_batches(database, settings.model_name, settings.claim_lease_s)] == [batch_id]
        outcome = pipeline.assess_batch(database, settings, batch_id)
        assert outcome.processed and outcome.status == "done"
        # The crashed run's claim is void: it can neither give the batch back nor fail it.
        assert pipeline.release_claim(database, crashed) is False
        from shiftcost.pipeline.claims import fail_claimed

        assert fail_claimed(database, crashed, "late") is False
    assert (env.count(db.Decision), env.count(db.IndexRun)) == (1, 1)
    assert env.rows(db.Batch)[0].status == "done"


@sqlite_only
def test_a_stored_cost_model_predicts_exactly_as_the_fitted_one(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    fitted = pipeline.fit_cost_model(hand_made_calibration(), level=0.8, features=["resque_dist"])
    with pipeline.connect(env.settings) as database:
        with database.session() as session:
            row = pipeline.store_cost_model(session, "digits_cnn", fitted, source="sweep")
        with database.session(readonly=True) as session:
            loaded, latest = pipeline.load_cost_model(session, "digits_cnn", model_name=env.settings.model_name)
    assert latest.id == row.id and latest.version == 2  # version 1 came from the bootstrap
    inputs = [{"resque_dist": value} for value in (0.0, 0.05, 0.2, 0.5)]
    options = {"samples": 160, "joules_per_sample_epoch": 0.5, "carbon_intensity": 0.05}
    assert [p.to_dict() for p in loaded.predict_costs(inputs, **options)] == [p.to_dict() for p in fitted.predict_costs(inputs, **options)]


@sqlite_only
def test_two_models_of_one_architecture_each_forecast_and_learn_with_their_own_calibration(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    own = env.bootstrapped.calibration_id
    # Registered after it, a sibling of the same architecture whose retrains ran four times as long.
    slower = [row | {"epochs": 4 * row["epochs"]} for row in hand_made_calibration()]
    x_ref, y_ref = env.trained.splits["holdout"]
    sibling = pipeline.bootstrap(
        env.settings, env.trained.model, env.trained.spec, x_ref, y_ref, name="sibling",
        calibration=pipeline.fit_cost_model(slower, level=0.8, features=["resque_dist"]), joules_per_sample_epoch=0.5,
    )  # fmt: skip
    assert sibling.calibration_id > own
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)

    (result,) = pipeline.watch_once(env.settings)

    assert result.assessment.action == "retrain" and result.retraining.status == "succeeded", result.to_dict()
    (prediction,) = env.rows(db.CostPrediction)
    assert prediction.calibration_id == own
    refit = env.rows(db.Calibration)[-1]
    assert refit.source == "refit" and refit.model_id == env.bootstrapped.model.model_id
    own_rows = env.rows(db.Calibration, db.Calibration.id == own)[0].fit_data["rows"]
    assert refit.fit_data["rows"][:-1] == own_rows  # its own ten runs and the new one, none of the sibling's


@sqlite_only
def test_an_architectures_energy_rate_at_another_input_size_neither_prices_nor_refits_this_models(pipeline_env: PipelineEnv) -> None:
    from shiftcost.data import build_model
    from shiftcost.store import repository
    from tests.store import seed

    env = pipeline_env
    # The same architecture on images four times the size, measured on this host after the bootstrap's 0.5 J.
    _, larger = build_model("digits_cnn", 10, in_channels=1, image_size=16)
    with pipeline.connect(env.settings) as database:
        pipeline.record_energy_probe(database, larger, 8.0, hardware="test machine")
        with database.session() as session:
            wide = seed.model(session, name="wide", architecture="digits_cnn", details={"spec": larger.to_dict()})
            run = repository.start_retrain_run(session, wide.id)
            work = {"energy": {"energy_kwh": 1e-3}, "samples_seen": 400, "curve": [0.5, 0.9], "holdout_samples": 50, "device": "cpu"}
            repository.finish_retrain_run(session, run.id, "succeeded", energy_kwh=1e-3, details=work)
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)

    (result,) = pipeline.watch_once(env.settings)

    assert result.retraining is not None and result.retraining.status == "succeeded", result.to_dict()
    (prediction,) = env.rows(db.CostPrediction)
    assert prediction.joules_per_sample_epoch == 0.5
    (own,) = env.rows(db.RetrainRun, db.RetrainRun.model_id == env.bootstrapped.model.model_id)
    refit = own.details["energy_rate"]
    assert refit["joules_per_sample_before"] == 0.5 and refit["runs"] == 1  # the wide model's run left out
    newest = env.rows(db.EnergyProbe)[-1]
    assert (newest.image_size, newest.measurement_method) == ("1x8x8", "refitted")


@sqlite_only
def test_batches_in_an_fsspec_landing_location_go_through_the_library_pipeline(pipeline_env: PipelineEnv) -> None:
    import fsspec

    from shiftcost.data import Batch, content_fingerprint, save_batch

    env = pipeline_env
    local = save_batch(Batch(*env.stream(0, 200), "clean"), env.root / "clean.npz")
    folder = f"/incoming-{env.root.name}"  # the memory filesystem is shared by the whole process
    remote = fsspec.filesystem("memory")
    remote.pipe(f"{folder}/clean.npz", local.read_bytes())
    remote.pipe(f"{folder}/.half-written.npz", b"not yet")
    settings = env.settings.model_copy(update={"landing": f"memory://{folder}"})

    (result,) = pipeline.watch_once(settings)

    assert result.registration.source_uri == f"memory://{folder}/clean.npz"
    assert result.registration.fingerprint == content_fingerprint(local)
    assert result.assessment.status == "done" and result.assessment.action == "skip"
    assert pipeline.watch_once(settings) == []


@sqlite_only
def test_shiftcost_assess_path_runs_one_batch_once_and_reports_it(pipeline_env: PipelineEnv) -> None:
    from typer.testing import CliRunner

    from shiftcost.cli import app

    env = pipeline_env
    path = env.drop("clean.npz", *env.stream(0, 200))
    runner = CliRunner()

    first = runner.invoke(app, ["assess", str(path), "--json"])
    second = runner.invoke(app, ["assess", str(path), "--json"])
    table = runner.invoke(app, ["assess", str(path)])

    assert first.exit_code == 0, first.output
    done = json.loads(first.stdout)
    assert done["registration"]["created"] and done["assessment"]["action"] == "skip"
    again = json.loads(second.stdout)
    assert not again["registration"]["created"] and not again["assessment"]["processed"]
    assert again["assessment"]["decision_id"] == done["assessment"]["decision_id"]
    assert "registered before" in table.stdout and "no_drift" in table.stdout
    bad = env.root / "bad.npz"
    bad.write_bytes(b"nonsense")
    refused = runner.invoke(app, ["assess", str(bad), "--json"])
    assert refused.exit_code == 2 and json.loads(refused.stdout)["assessment"]["status"] == "failed"
    assert env.count(db.Decision) == 1


def test_the_library_and_command_line_never_import_prefect() -> None:
    code = (
        "import sys, importlib, pkgutil, shiftcost.pipeline, shiftcost.landing, shiftcost.cli\n"
        "for m in pkgutil.walk_packages(shiftcost.pipeline.__path__, 'shiftcost.pipeline.'): importlib.import_module(m.name)\n"
        "print('prefect' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


@pytest.mark.parametrize("command", ["serve", "assess"])
def test_the_pipeline_commands_have_help(command: str) -> None:
    from typer.testing import CliRunner

    from shiftcost.cli import app

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_tasks_retry_passing_faults_and_never_a_users_mistake() -> None:
    import sqlite3

    from sqlalchemy import exc

    from shiftcost.errors import ConfigError, InputError
    from shiftcost.store.errors import DatabaseUnavailableError
    from tasks.common import _transient

    lost = exc.OperationalError("INSERT INTO decisions ...", {}, sqlite3.OperationalError("disk I/O error"))
    assert _transient(lost) and _transient(DatabaseUnavailableError("Cannot use the database")) and _transient(ConnectionResetError())
    assert not _transient(InputError("Batch x.npz is empty")) and not _transient(ConfigError("no cost model"))
    assert not _transient(exc.IntegrityError("INSERT ...", {}, sqlite3.IntegrityError("UNIQUE constraint failed")))


def _defer_a_drifted_batch(env: PipelineEnv, database: Any) -> tuple[int, int]:
    """A monthly budget held almost whole by another reservation, then a drifted batch: deferred.

    Returns ``(batch_id, reservation_id)`` of the deferred batch and the holding reservation.
    """
    from tests.store import seed

    env.budget("monthly", period="monthly", kwh=1.0)
    env.drop("clean.npz", *env.stream(0, 250))
    (first,) = pipeline.watch_once(env.settings, db=database)
    left = seed.committed(database).remaining("monthly").remaining_kwh
    holding = seed.committed(database).reserve("monthly", left - 1e-12, 0.0, first.assessment.decision_id)
    x, y = env.stream(250, 450)
    env.drop("bright.npz", brightened(x), y)
    (deferred,) = pipeline.watch_once(env.settings, db=database)
    assert deferred.assessment.action == "defer" and deferred.assessment.status == "assessed"
    return deferred.assessment.batch_id, holding


def test_a_deferred_batch_is_assessed_afresh_once_its_budget_period_is_over(pipeline_env: PipelineEnv) -> None:
    from shiftcost.store import audit
    from tests.store import seed

    env = pipeline_env
    with pipeline.connect(env.settings) as database:
        batch_id, holding = _defer_a_drifted_batch(env, database)
        (decision,) = env.rows(db.Decision, db.Decision.batch_id == batch_id)
        month_end = seed.committed(database).remaining("monthly").window_end
        assert decision.retry_after == month_end and decision.blocked_by_budget
        with database.session(readonly=True) as session:
            (audited,) = audit.decisions(session, action="defer").rows
        assert (audited["batch_id"], audited["retry_after"]) == (batch_id, month_end)
        # Not before the period that was short ends; then exactly once.
        assert pipeline.requeue_deferred(database, env.settings.model_name) == []
        assert pipeline.watch_once(env.settings, db=database) == []
        assert pipeline.requeue_deferred(database, env.settings.model_name, now=month_end - timedelta(seconds=1)) == []
        assert pipeline.requeue_deferred(database, env.settings.model_name, now=month_end) == [batch_id]
        assert pipeline.requeue_deferred(database, env.settings.model_name, now=month_end) == []
        # A new period: the holding reservation is gone, so the fresh assessment retrains.
        seed.committed(database).release(holding, "the period it held is over")
        (again,) = pipeline.watch_once(env.settings, db=database)
    assert again.assessment.batch_id == batch_id and again.assessment.action == "retrain"
    assert again.retraining is not None and again.retraining.status == "succeeded"
    decisions = env.rows(db.Decision, db.Decision.batch_id == batch_id)
    assert [d.action for d in decisions] == ["defer", "retrain"] and decisions[1].retry_after is None
    assert env.count(db.IndexRun, db.IndexRun.batch_id == batch_id) == 2  # both assessments are kept
    assert env.rows(db.Batch, db.Batch.id == batch_id)[0].status == "done"


def test_racing_watchers_requeue_a_due_deferred_batch_exactly_once(pipeline_env: PipelineEnv) -> None:
    from tests.store import seed

    env = pipeline_env
    with pipeline.connect(env.settings) as database:
        batch_id, _ = _defer_a_drifted_batch(env, database)
        due = seed.committed(database).remaining("monthly").window_end
        start = threading.Barrier(8)

        def requeue() -> list[int]:
            start.wait()
            return pipeline.requeue_deferred(database, env.settings.model_name, now=due)

        with ThreadPoolExecutor(8) as pool:
            moved = [batch for result in pool.map(lambda _: requeue(), range(8)) for batch in result]
    assert moved == [batch_id]
    assert env.rows(db.Batch, db.Batch.id == batch_id)[0].status == "registered"


def test_a_retrain_run_whose_process_was_killed_is_closed_once_and_its_reservation_released(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)
    model_name = env.settings.model_name
    with pipeline.connect(env.settings) as database:
        (assessed,) = pipeline.watch_once(env.settings, retrain=False, db=database)
        assert assessed.assessment.action == "retrain"
        killed = pipeline.claim_retrain(database, assessed.assessment.batch_id)  # its process dies here
        assert killed is not None and env.remaining_kwh("monthly") < 1.0
        assert pipeline.fail_stale_retrains(database, model_name, older_than_s=3600) == []  # it may still be running
        later = db.utcnow() + timedelta(hours=2)
        start = threading.Barrier(8)

        def close() -> list[pipeline.RetrainOutcome]:
            start.wait()
            return pipeline.fail_stale_retrains(database, model_name, older_than_s=3600, now=later)

        with ThreadPoolExecutor(8) as pool:
            closed = [outcome for result in pool.map(lambda _: close(), range(8)) for outcome in result]
    assert [(outcome.run_id, outcome.status) for outcome in closed] == [(killed.run_id, "failed")]
    (run,) = env.rows(db.RetrainRun)
    assert run.status == "failed" and run.error.startswith("abandoned") and run.finished_at is not None
    (batch,) = env.rows(db.Batch)
    assert batch.status == "failed" and "abandoned" in batch.failure_reason
    assert [entry.kind for entry in env.rows(db.LedgerEntry)] == ["reserve", "release"]
    assert env.remaining_kwh("monthly") == pytest.approx(1.0)
    assert [model.version for model in env.rows(db.Model)] == [1]
