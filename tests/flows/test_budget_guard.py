"""The in-flight budget guard in the pipeline: a run the budget cannot hold is stopped."""

from __future__ import annotations

import pytest
import torch

from shiftcost.store import models as db
from tests.flows.flow_support import TrainedModel, brightened, environment_settings

JOULES_PER_SAMPLE = 0.5
#: About 0.4 epochs of the test's retrain pool (200 images: 140 trained on plus as many replayed).
BUDGET_KWH = 60.0 / 3.6e6


def optimistic_calibration() -> list[dict[str, object]]:
    """Calibration runs that all recovered within a fifth of an epoch: the index model promises a cheap retrain."""
    scatter = (0.2, -0.1, 0.15, -0.2, 0.0, 0.1, -0.15, 0.2, -0.05, 0.1)
    return [{"resque_dist": 0.03 * i, "epochs": 0.05 + 0.3 * 0.03 * i + 0.02 * scatter[i], "reached_cutoff": True} for i in range(10)]


@pytest.fixture
def guarded_env(database_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch, trained_model: TrainedModel):
    from shiftcost import pipeline
    from tests.store import seed

    settings = environment_settings(database_url, tmp_path, monkeypatch)
    landing = tmp_path / "landing"
    cost_model = pipeline.fit_cost_model(optimistic_calibration(), level=0.8, features=["resque_dist"])
    pipeline.bootstrap(
        settings, trained_model.model, trained_model.spec, *trained_model.splits["holdout"],
        calibration=cost_model, joules_per_sample_epoch=JOULES_PER_SAMPLE, hardware="test",
    )  # fmt: skip
    with pipeline.connect(settings) as database:
        seed.committed(database).create_budget("per-run", period="per_run", kwh_cap=BUDGET_KWH)
    return settings, landing, trained_model


def test_a_run_the_budget_cannot_hold_is_stopped_settled_and_leaves_the_model_as_it_was(guarded_env) -> None:
    from sqlalchemy import select

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch

    settings, landing, trained = guarded_env
    x, y = trained.splits["stream"]
    x, y = x[:200], y[:200].clone()
    # 0s called 1s and 1s called 0s: far harder to learn than the indices say, so the real
    # run needs many times the fifth of an epoch the cost model promises.
    swapped = torch.where(y == 0, 1, torch.where(y == 1, 0, y))
    save_batch(Batch(brightened(x), swapped, "swap"), landing / "swap.npz")
    (result,) = pipeline.watch_once(settings)
    assert result.assessment.action == "retrain", result.to_dict()
    outcome = result.retraining
    assert outcome is not None and outcome.status == "stopped_by_budget", result.to_dict()

    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        run = session.get(db.RetrainRun, outcome.run_id)
        batch = session.get(db.Batch, outcome.batch_id)
        decision = session.get(db.Decision, outcome.decision_id)
        versions = session.scalars(select(db.Model.version).where(db.Model.name == settings.model_name)).all()
        entries = session.scalars(select(db.LedgerEntry).where(db.LedgerEntry.decision_id == decision.id)).all()
        assert run.status == "stopped_by_budget" and not run.reached_cutoff and run.new_model_id is None
        assert batch.status == "stopped_by_budget" and "budget" in (batch.failure_reason or "")
        assert versions == [1]
        # What the budget had left at reservation is what the guard held the run to.
        assert [b["remaining_kwh"] for b in decision.budget_state] == [pytest.approx(BUDGET_KWH)]
        assert run.epochs < 1.0 and "beyond the budget" in run.details["stop_reason"]
        # The measured spend is settled, once, on the reservation.
        reserves = [e for e in entries if e.kind == "reserve"]
        settles = [e for e in entries if e.kind == "settle"]
        assert len(reserves) == 1 and len(settles) == 1 and settles[0].reservation_id == reserves[0].id
        assert settles[0].energy_kwh == pytest.approx(run.energy_kwh) and run.energy_kwh > 0


def test_each_real_retrain_refits_the_host_energy_rate_as_the_median_over_runs(guarded_env) -> None:
    from sqlalchemy import select

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch

    settings, landing, trained = guarded_env
    x, y = trained.splits["stream"]
    for name, part in (("one", slice(0, 150)), ("two", slice(150, 300))):
        swapped = torch.where(y[part] == 0, 1, torch.where(y[part] == 1, 0, y[part]))
        save_batch(Batch(brightened(x[part]), swapped, name), landing / f"{name}.npz")
        (result,) = pipeline.watch_once(settings)
        assert result.retraining is not None and result.retraining.energy_kwh, result.to_dict()

    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        runs = session.scalars(select(db.RetrainRun).order_by(db.RetrainRun.id)).all()
        probes = session.scalars(select(db.EnergyProbe).order_by(db.EnergyProbe.id)).all()
        # Joules per unit of work of each run, counted here from its own record: samples
        # trained plus a third of each evaluation's holdout.
        ratios = []
        for run in runs:
            work = run.details["samples_seen"] + len(run.details["curve"]) * run.details["holdout_samples"] / 3.0
            ratios.append(run.energy_kwh * 3.6e6 / work)
            assert run.details["energy_rate"]["measured_kwh"] == pytest.approx(run.energy_kwh)
        assert [p.measurement_method for p in probes] == ["given", "refitted", "refitted"]
        assert probes[1].joules_per_sample_epoch == pytest.approx(ratios[0])
        assert probes[2].joules_per_sample_epoch == pytest.approx(sum(ratios) / 2)  # the median of two
        first_work = runs[0].details["samples_seen"] + len(runs[0].details["curve"]) * runs[0].details["holdout_samples"] / 3.0
        assert runs[0].details["energy_rate"]["estimated_kwh"] == pytest.approx(JOULES_PER_SAMPLE * first_work / 3.6e6)
        assert runs[1].details["energy_rate"]["joules_per_sample_before"] == pytest.approx(ratios[0])


def test_a_run_at_another_thread_count_than_its_rate_says_so_and_refits_on_its_own_count(guarded_env) -> None:
    from sqlalchemy import select

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch

    settings, landing, trained = guarded_env
    x, y = trained.splits["stream"]
    threads = torch.get_num_threads()
    try:
        for name, part, count in (("one", slice(0, 150), threads), ("two", slice(150, 300), threads + 1)):
            torch.set_num_threads(count)  # the first run's refit stamps the rate with this process's count
            swapped = torch.where(y[part] == 0, 1, torch.where(y[part] == 1, 0, y[part]))
            save_batch(Batch(brightened(x[part]), swapped, name), landing / f"{name}.npz")
            (result,) = pipeline.watch_once(settings)
            assert result.retraining is not None and result.retraining.energy_kwh, result.to_dict()
    finally:
        torch.set_num_threads(threads)
    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        first, second = session.scalars(select(db.RetrainRun).order_by(db.RetrainRun.id)).all()
        probes = session.scalars(select(db.EnergyProbe).order_by(db.EnergyProbe.id)).all()
        refitted = [p.details["rate"] for p in probes if p.measurement_method == "refitted"]
    assert (first.details["torch_threads"], second.details["torch_threads"]) == (threads, threads + 1)
    # The given rate records no thread count; the refitted one was fitted at `threads`.
    assert not any("torch thread" in note for note in first.details.get("notes", []))
    expected = f"fitted at {threads} torch thread(s) and this retrain trains at {threads + 1}"
    assert any(expected in note for note in second.details["notes"]), second.details.get("notes")
    # The second refit pools only the runs at its own count: itself.
    assert [(r["threads"], r["runs"], r["device"]) for r in refitted] == [(threads, 1, "cpu"), (threads + 1, 1, "cpu")]


def test_a_rate_is_refitted_on_runs_of_its_own_kind_of_device() -> None:
    from shiftcost.pipeline.retrain_record import runs_alike

    earlier = [
        {"device": "cpu", "torch_threads": 2}, {"device": "cpu", "torch_threads": 4}, {"device": "cuda:0", "torch_threads": 2},
        {"device": "cuda:1", "torch_threads": 8}, {"torch_threads": None}, None,
    ]  # fmt: skip
    assert runs_alike(earlier, "cpu", 2) == [earlier[0], earlier[4]]
    # On a GPU the CPU thread count does not set the rate.
    assert runs_alike(earlier, "cuda", 2) == [earlier[2], earlier[3], earlier[4]]


def claimed_bright_batch(guarded_env) -> tuple[object, object, int, int]:
    """A claimed retrain of 200 brightened images: its inputs, its config, its holdout, and the pool
    an epoch trains on, counted here from the recipe's rule (half of each epoch's pool is
    replayed, capped by the reference)."""
    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from shiftcost.pipeline.retrain import load_replay_data
    from shiftcost.recipe import RetrainConfig

    settings, landing, trained = guarded_env
    x, y = trained.splits["stream"]
    save_batch(Batch(brightened(x[:200]), y[:200], "bright"), landing / "bright.npz")
    with pipeline.connect(settings) as database:
        (assessed,) = pipeline.watch_once(settings, retrain=False, db=database)
        job = pipeline.claim_retrain(database, assessed.assessment.batch_id)
        inputs = pipeline.load_for_retrain(database, settings, job)
    config = RetrainConfig.from_settings(settings).for_model(inputs.spec)
    replayable = len(load_replay_data(inputs, config))
    holdout = round(200 * config.cutoff.holdout_fraction)
    train = 200 - holdout
    return inputs, config, holdout, train + min(train, replayable)


def joules(pool_samples: int, holdout: int, batch_size: int, epochs: float) -> float:
    """What ``epochs`` over ``pool_samples`` cost at the test's rate, every evaluation included."""
    from shiftcost.energy import EVAL_SAMPLE_WEIGHT
    from shiftcost.forecast import protocol

    per_epoch = protocol.steps_per_epoch(pool_samples, batch_size)
    evaluations = protocol.evaluations(epochs, per_epoch)  # the one at step 0 included
    return JOULES_PER_SAMPLE * (epochs * pool_samples + EVAL_SAMPLE_WEIGHT * evaluations * holdout)


def test_the_guard_prices_the_epochs_still_to_come_at_the_pool_the_run_trains_on_replay_included(guarded_env) -> None:
    """With a forecast of five epochs and a budget between what they cost on the batch alone and
    what they cost with the replayed reference samples, the run is stopped before its first step:
    the epochs to come train on both."""
    import dataclasses

    from shiftcost import pipeline

    settings = guarded_env[0]
    inputs, config, holdout, pool = claimed_bright_batch(guarded_env)
    train = 200 - holdout
    assert pool > train
    without_replay, with_replay = (joules(samples, holdout, config.recipe.batch_size, 5.0) for samples in (train, pool))
    assert without_replay < with_replay
    five_epochs = {"median": 6.0, "low": 5.0, "high": 8.0, "level": 0.8, "stage": "index"}
    budget_kwh = (without_replay + with_replay) / 2 / 3.6e6
    guarded = dataclasses.replace(inputs, decided_epochs=five_epochs, budget_left_kwh=budget_kwh)

    result = pipeline.execute_retrain(settings, guarded)

    assert result.pool_samples == pool
    assert result.status == "stopped_by_budget" and result.steps == 0, result.stop_reason
    assert "at least 5.00 epochs" in result.stop_reason


def test_the_guard_holds_the_run_to_the_settings_epoch_cap_not_the_calibrated_one(guarded_env) -> None:
    """Retrains capped at one epoch by the settings: a forecast of at least two epochs is past that
    cap (the calibrated one is 15), and the guard's sentence says so when it stops the run."""
    import dataclasses

    from shiftcost import pipeline

    settings, _, _ = guarded_env
    inputs, config, holdout, pool = claimed_bright_batch(guarded_env)
    assert inputs.forecaster.max_epochs == 15.0
    capped = settings.model_copy(update={"retrain_max_epochs": 1.0})
    two_epochs = {"median": 3.0, "low": 2.0, "high": 4.0, "level": 0.8, "stage": "index"}
    budget_kwh = 1.5 * joules(pool, holdout, config.recipe.batch_size, 1.0) / 3.6e6  # holds one epoch, not two
    guarded = dataclasses.replace(inputs, decided_epochs=two_epochs, budget_left_kwh=budget_kwh)

    result = pipeline.execute_retrain(capped, guarded)

    assert result.status == "stopped_by_budget" and result.steps == 0, result.stop_reason
    assert "past the run's cap of 1.00 where it would stop short of the cutoff" in result.stop_reason


def test_a_stage_zero_forecaster_prices_the_retrain_at_the_model_files_batch_size(database_url, tmp_path, monkeypatch, trained_model) -> None:
    """A plain cost model records no batch size; the guard's forecaster takes the one the retrain
    runs at, the model file's recipe over the settings, as the assessment did, so the retrain's
    own check does not refuse it."""
    import dataclasses

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from tests.store import seed

    settings = environment_settings(database_url, tmp_path, monkeypatch)
    assert settings.retrain_batch_size != 32
    spec = dataclasses.replace(trained_model.spec, recipe={"batch_size": 32})
    cost_model = pipeline.fit_cost_model(optimistic_calibration(), level=0.8, features=["resque_dist"])
    pipeline.bootstrap(
        settings, trained_model.model, spec, *trained_model.splits["holdout"],
        calibration=cost_model, joules_per_sample_epoch=JOULES_PER_SAMPLE, hardware="test",
    )  # fmt: skip
    with pipeline.connect(settings) as database:
        seed.committed(database).create_budget("per-run", period="per_run", kwh_cap=1.0)
    x, y = trained_model.splits["stream"]
    save_batch(Batch(brightened(x[:200]), y[:200], "bright"), tmp_path / "landing" / "bright.npz")
    with pipeline.connect(settings) as database:
        (assessed,) = pipeline.watch_once(settings, retrain=False, db=database)
        assert assessed.assessment.action == "retrain", assessed.to_dict()
        job = pipeline.claim_retrain(database, assessed.assessment.batch_id)
        inputs = pipeline.load_for_retrain(database, settings, job)
    assert inputs.spec.recipe == {"batch_size": 32}
    assert inputs.forecaster is not None and inputs.forecaster.batch_size == 32
