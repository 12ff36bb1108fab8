"""Bad input and faults in the flows: each ends with a reason stored and nothing half done."""

from __future__ import annotations

import pytest
import torch
from flow_support import PipelineEnv, brightened, sqlite_only

from shiftcost.store import models as db

pytestmark = [pytest.mark.usefixtures("prefect_server"), sqlite_only]


def run_watch() -> list[dict]:
    from flows.watch import watch

    return watch()


def batch_named(env: PipelineEnv, name: str) -> db.Batch:
    (batch,) = [batch for batch in env.rows(db.Batch) if batch.source_uri.endswith(name)]
    return batch


def test_a_corrupt_or_unreadable_file_fails_with_its_reason_and_the_watcher_carries_on(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    (env.landing / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a whole zip archive")
    (env.landing / "gone.npz").symlink_to(env.root / "deleted-meanwhile.npz")  # a link to nothing
    (env.landing / "notes.txt").write_text("not a batch")
    env.drop("good.npz", *env.stream(0, 200))

    results = run_watch()

    corrupt, gone, notes = batch_named(env, "corrupt.npz"), batch_named(env, "gone.npz"), batch_named(env, "notes.txt")
    assert corrupt.status == gone.status == notes.status == "failed"
    assert "corrupt.npz is not a readable .npz" in corrupt.failure_reason
    assert "gone.npz is a symbolic link" in gone.failure_reason  # refused as a link, never followed
    assert "unknown format" in notes.failure_reason
    good = batch_named(env, "good.npz")
    assert good.status == "done" and [r["batch_id"] for r in results] == [good.id]
    assert env.count(db.Decision) == 1 and env.count(db.IndexRun) == 1
    # Known failures are not registered or retried again on the next poll.
    assert run_watch() == [] and env.count(db.Batch) == 4


def test_a_batch_whose_images_do_not_fit_the_model_fails_with_the_reason(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    x, y = env.stream(0, 100)
    env.drop("rgb.npz", x.expand(-1, 3, -1, -1).repeat(1, 1, 2, 2).contiguous(), y)  # 3 x 16 x 16 for a 1 x 8 x 8 model

    (result,) = run_watch()

    batch = batch_named(env, "rgb.npz")
    assert batch.status == "failed" == result["status"]
    assert "(3, 16, 16)" in batch.failure_reason and "(1, 8, 8)" in batch.failure_reason
    assert result["failure_reason"] == batch.failure_reason
    assert env.count(db.IndexRun) == 0 and env.count(db.Decision) == 0 and env.count(db.DriftReport) == 0


def test_labels_the_model_never_saw_are_a_task_change_with_resque_task_in_the_reasons(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    new_task = torch.where(y < 5, y, y + 5)  # digits 5..9 relabelled 10..14: classes the model has no output for
    env.drop("new-task.npz", brightened(x), new_task)

    (result,) = run_watch()

    (decision,) = env.rows(db.Decision)
    (index_run,) = env.rows(db.IndexRun)
    reasons = {reason["code"]: reason for reason in decision.reasons}
    assert index_run.resque_task is not None and 0.0 <= index_run.resque_task <= 1.0
    change = reasons["task_change"]
    assert change["numbers"]["resque_task"] == pytest.approx(index_run.resque_task)
    assert f"RESQUE_task = {index_run.resque_task:.4g}" in change["message"]
    assert change["numbers"]["new_labels"] == ["10", "11", "12", "13", "14"]
    # Retraining this model cannot learn classes it has no output for: refused, with the reason.
    assert decision.action == "skip" and reasons["new_classes"]["blocking"]
    assert result["action"] == "skip" and env.count(db.RetrainRun) == 0 and env.count(db.LedgerEntry) == 0


def test_a_retrain_that_crashes_is_failed_its_measured_spend_settled_and_the_model_unchanged(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)
    steps: list[int] = []

    def crash_while_training(module: torch.nn.Module, args: tuple) -> None:
        if module.training and type(module).__name__ == "DigitsCNN":
            steps.append(1)
            if len(steps) == 2:
                raise RuntimeError("CUDA out of memory")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(crash_while_training)
    try:
        (result,) = run_watch()
    finally:
        handle.remove()

    assert len(steps) == 2 and result["action"] == "retrain"
    assert result["retraining"]["flow_state"] == "FAILED"
    (run,) = env.rows(db.RetrainRun)
    assert run.status == "failed" and "CUDA out of memory" in run.error
    assert run.steps == 1 and run.energy_kwh is not None and run.energy_kwh > 0  # what it spent until the crash
    # The process survived its crash and measured what it spent: that spend is charged, not
    # released (a process killed outright measures nothing; the watch releases its reservation).
    reserve, settle = env.rows(db.LedgerEntry)
    assert (reserve.kind, settle.kind, settle.reservation_id) == ("reserve", "settle", reserve.id)
    assert settle.energy_kwh == run.energy_kwh and settle.emissions_kg == run.emissions_kg
    assert "CUDA out of memory" in settle.reason
    assert env.remaining_kwh("monthly") == pytest.approx(1.0 - run.energy_kwh)
    assert [model.version for model in env.rows(db.Model)] == [1]
    assert [calibration.version for calibration in env.rows(db.Calibration)] == [1]
    batch = batch_named(env, "bright.npz")
    assert batch.status == "failed" and "CUDA out of memory" in batch.failure_reason
    # Nothing retries a crashed run on its own: it spent energy, a new decision is needed.
    assert run_watch() == [] and env.count(db.RetrainRun) == 1
