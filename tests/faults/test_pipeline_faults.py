"""Faults of the pipeline around the ledger: no reservation outlives its decision, a run closed
as dead still records its spend, a failed save leaves nothing behind but keeps the energy.

Each runs on SQLite and PostgreSQL (``pipeline_env`` is built on the ``database_url`` fixture).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from flow_support import PipelineEnv, brightened

from shiftcost import pipeline
from tests.store import seed
from shiftcost.store import models as db


def _drifted(env: PipelineEnv) -> None:
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)


def _claimed_retrain(env: PipelineEnv, database) -> tuple[pipeline.RetrainJob, pipeline.RetrainInputs]:
    """The drifted batch assessed, its retrain claimed and its inputs loaded, not yet run."""
    (assessed,) = pipeline.watch_once(env.settings, retrain=False, db=database)
    job = pipeline.claim_retrain(database, assessed.assessment.batch_id)
    return job, pipeline.load_for_retrain(database, env.settings, job)


def test_assess_without_retraining_leaves_no_open_reservation(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    _drifted(env)
    result = pipeline.process_batch(env.settings, str(env.landing / "bright.npz"), retrain=False)
    assert result.assessment.action == "retrain" and result.retraining is None
    assert [e.kind for e in env.rows(db.LedgerEntry)] == ["reserve", "release"]
    assert env.remaining_kwh("monthly") == pytest.approx(1.0)


def test_a_run_closed_as_dead_that_still_finishes_records_a_late_settlement(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    _drifted(env)
    with pipeline.connect(env.settings) as database:
        job, inputs = _claimed_retrain(env, database)
        # Cut off long enough to be taken as dead: the watch closes the run and releases.
        later = db.utcnow() + timedelta(hours=1)
        (closed,) = pipeline.fail_stale_retrains(database, env.settings.model_name, 900, now=later)
        assert closed.released and env.remaining_kwh("monthly") == pytest.approx(1.0)
        result = pipeline.execute_retrain(env.settings, inputs)
        new_version = pipeline.build_new_version(env.settings, inputs, result)
        outcome = pipeline.record_retrain_success(database, inputs, result, new_version, None)
        status = seed.committed(database).remaining("monthly")
    measured = result.energy.energy_kwh
    assert measured > 0 and outcome.settled
    assert [e.kind for e in env.rows(db.LedgerEntry)] == ["reserve", "release", "settle"]
    assert status.late_kwh == pytest.approx(measured) and status.remaining_kwh == pytest.approx(1.0 - measured)
    assert [m.version for m in env.rows(db.Model)] == [1]  # the batch was failed: no new version
    (run,) = env.rows(db.RetrainRun)
    assert run.energy_kwh == pytest.approx(measured)


@pytest.mark.parametrize("ends", ["succeeds", "fails after measuring"])
def test_a_run_closed_as_dead_at_a_price_that_still_finishes_has_its_measure_replace_the_price(pipeline_env: PipelineEnv, ends: str) -> None:
    from shiftcost.pipeline import lease
    from shiftcost.store import audit_budget

    env = pipeline_env
    _drifted(env)
    with pipeline.connect(env.settings) as database:
        job, inputs = _claimed_retrain(env, database)
        # Its last heartbeat priced 4 steps; then nothing for an hour (the database away, say).
        assert lease.renew(database, job.run_id, progress=lease.Progress(4, 0.5, 2e-6, 1e-6))
        (closed,) = pipeline.fail_stale_retrains(database, env.settings.model_name, 900, now=db.utcnow() + timedelta(hours=1))
        assert closed.settled and env.remaining_kwh("monthly") == pytest.approx(1.0 - 2e-6)
        result = pipeline.execute_retrain(env.settings, inputs)
        if ends == "succeeds":
            outcome = pipeline.record_retrain_success(database, inputs, result, None, None)
        else:  # saving the new version failed, say
            outcome = pipeline.record_retrain_failure(database, job, OSError("disk full"), result)
        with database.session(readonly=True) as session:
            burn = audit_budget.budget_burn(session).totals
    measured = result.energy.energy_kwh
    assert measured > 0 and outcome.settled
    entries = env.rows(db.LedgerEntry)
    assert [e.kind for e in entries] == ["reserve", "settle", "settle"]
    assert entries[2].reservation_id == entries[1].id and "in place of the 2e-06 kWh" in entries[2].reason
    # The measure counts once, in place of the price: not beside it, and not as a late settlement.
    assert env.remaining_kwh("monthly") == pytest.approx(1.0 - measured)
    assert (burn["settled_kwh"], burn["late_kwh"]) == (pytest.approx(measured), 0)
    (run,) = env.rows(db.RetrainRun)
    assert run.energy_kwh == pytest.approx(measured) and run.energy_method != "priced"


def test_a_retrain_that_cannot_save_its_new_version_keeps_its_energy_and_leaves_no_files(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    _drifted(env)
    artifacts = pipeline.Artifacts.from_settings(env.settings)
    blocked = Path(artifacts.reference_data(env.settings.model_name, "run-1"))
    blocked.mkdir(parents=True)  # the reference data cannot be written where it must go
    with pipeline.connect(env.settings) as database:
        (assessed,) = pipeline.watch_once(env.settings, retrain=False, db=database)
        with pytest.raises(pipeline.RetrainFailed):
            pipeline.run_retrain(database, env.settings, assessed.assessment.batch_id)
    (run,) = env.rows(db.RetrainRun)
    assert run.status == "failed" and run.energy_kwh is not None and run.energy_kwh > 0
    reserve, settle = env.rows(db.LedgerEntry)  # the energy it measured is charged, not released
    assert (settle.kind, settle.reservation_id, settle.energy_kwh) == ("settle", reserve.id, run.energy_kwh)
    assert env.remaining_kwh("monthly") == pytest.approx(1.0 - run.energy_kwh)
    assert not Path(artifacts.model_weights(env.settings.model_name, "run-1")).exists()
    leftovers = [p.name for p in Path(artifacts.root).rglob("*") if p.is_file() and "run-1" in p.name]
    assert leftovers == []


def test_a_retrain_that_crashes_after_measured_work_settles_what_it_measured(pipeline_env: PipelineEnv) -> None:
    import torch

    env = pipeline_env
    _drifted(env)
    steps: list[int] = []

    def crash_on_the_second_step(module: torch.nn.Module, args: tuple) -> None:
        if module.training and type(module).__name__ == "DigitsCNN":
            steps.append(1)
            if len(steps) == 2:
                raise RuntimeError("CUDA out of memory")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(crash_on_the_second_step)
    try:
        with pipeline.connect(env.settings) as database:
            (assessed,) = pipeline.watch_once(env.settings, retrain=False, db=database)
            with pytest.raises(pipeline.RetrainFailed) as raised:
                pipeline.run_retrain(database, env.settings, assessed.assessment.batch_id)
            status = seed.committed(database).remaining("monthly")
    finally:
        handle.remove()
    (run,) = env.rows(db.RetrainRun)
    assert run.status == "failed" and run.steps == 1 and run.energy_kwh > 0
    reserve, settle = env.rows(db.LedgerEntry)
    assert (settle.kind, settle.reservation_id) == ("settle", reserve.id)
    assert (settle.energy_kwh, settle.emissions_kg) == (run.energy_kwh, run.emissions_kg)
    assert raised.value.outcome.settled == [settle.id] and raised.value.outcome.released == []
    assert status.settled_kwh == pytest.approx(run.energy_kwh) and status.open_reservations == 0
    assert status.remaining_kwh == pytest.approx(1.0 - run.energy_kwh)


def test_a_retrain_that_fails_before_measuring_anything_releases_its_reservation(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    _drifted(env)
    with pipeline.connect(env.settings) as database:
        (assessed,) = pipeline.watch_once(env.settings, retrain=False, db=database)
        job = pipeline.claim_retrain(database, assessed.assessment.batch_id)
        outcome = pipeline.record_retrain_failure(database, job, OSError("the batch file vanished"))
    assert outcome.settled == [] and len(outcome.released) == 1
    assert [e.kind for e in env.rows(db.LedgerEntry)] == ["reserve", "release"]
    assert env.remaining_kwh("monthly") == pytest.approx(1.0)


def test_a_one_image_batch_fails_with_a_sentence_naming_its_file(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    x, y = env.stream(0, 1)
    env.drop("single.npz", brightened(x), y)
    (result,) = pipeline.watch_once(env.settings, retrain=False)
    (batch,) = env.rows(db.Batch)
    assert batch.status == "failed"
    assert "single.npz" in batch.failure_reason and "at least 10" in batch.failure_reason


def test_a_drift_folder_that_cannot_be_written_is_one_sentence_and_nothing_is_half_written(pipeline_env: PipelineEnv) -> None:
    from shiftcost.errors import ConfigError

    env = pipeline_env
    _drifted(env)
    blocked = Path(pipeline.Artifacts.from_settings(env.settings).root) / "drift"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a folder")  # as a full or read-only disk would, writing there fails
    with pytest.raises(ConfigError, match="Cannot write the drift report .* SHIFTCOST_ARTIFACTS_DIR") as raised:
        pipeline.process_batch(env.settings, str(env.landing / "bright.npz"))
    assert "\n" not in str(raised.value)
    assert env.count(db.Decision) == 0 and env.count(db.LedgerEntry) == 0
