"""The promotion gate: a retrain that makes the model worse on its reference is rejected."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.errors import InputError
from shiftcost.store import models as db
from tests.flows.flow_support import TrainedModel, brightened, environment_settings, hand_made_calibration


@pytest.fixture
def worse_env(database_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch, trained_model: TrainedModel):
    """The digits model bootstrapped with a recipe that replays nothing (so it can forget)."""
    from shiftcost import pipeline

    settings = environment_settings(database_url, tmp_path, monkeypatch, SHIFTCOST_RETRAIN_MAX_EPOCHS="15")
    landing = tmp_path / "landing"
    spec = dataclasses.replace(trained_model.spec, recipe={"replay_fraction": 0.0, "lr": 0.01})
    cost_model = pipeline.fit_cost_model(hand_made_calibration(), level=0.8, features=["resque_dist"])
    pipeline.bootstrap(settings, trained_model.model, spec, *trained_model.splits["holdout"], calibration=cost_model, joules_per_sample_epoch=0.5, hardware="test")
    return settings, landing, trained_model


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_retrain_that_makes_the_model_worse_is_rejected_and_the_old_version_stays_current(worse_env, backend) -> None:
    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from shiftcost.store import repository

    settings, landing, trained = worse_env
    x, y = trained.splits["stream"]
    x, y = x[:200], y[:200].clone()
    # The batch calls every 0 a 1 and every 1 a 0: learning that costs the reference its 0s and 1s.
    swapped = torch.where(y == 0, 1, torch.where(y == 1, 0, y))
    save_batch(Batch(brightened(x), swapped, "swap"), landing / "swap.npz")
    (result,) = pipeline.watch_once(settings)
    outcome = result.retraining
    assert outcome is not None and outcome.reached_cutoff, result.to_dict()
    assert outcome.new_model_status == "rejected" and any("rejected" in note for note in outcome.notes)

    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        current = repository.get_model(session, settings.model_name)
        rejected = repository.get_model(session, settings.model_name, 2)
        gate = rejected.details["gate"]
        run = session.get(db.RetrainRun, outcome.run_id)
        assert current.version == 1 and rejected.status == "rejected"
        assert gate["reached_target"] and not gate["passed"]
        assert gate["new_accuracy"] < gate["parent_accuracy"] - gate["tolerance"]
        # The budget still records what it cost.
        assert run.energy_kwh is not None and run.energy_kwh > 0 and run.status == "succeeded"

    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["model", "list", "--json"]).stdout)
    assert [(v["version"], v["status"], v["current"]) for v in listed] == [(1, "active", True), (2, "rejected", False)]
    refused = runner.invoke(app, ["model", "approve", "2"])
    assert isinstance(refused.exception, InputError) and "--force" in str(refused.exception)
    forced = runner.invoke(app, ["model", "approve", "2", "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    listed = json.loads(runner.invoke(app, ["model", "list", "--json"]).stdout)
    assert [v["current"] for v in listed] == [False, True]
