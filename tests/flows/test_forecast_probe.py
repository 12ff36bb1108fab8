"""The assessment's probe: run when it can change the decision, stored, and charged to the budget once."""

from __future__ import annotations

import math

import pytest

from shiftcost.store import models as db
from tests.flows.flow_support import PROBE, PROBE_JOULES_PER_SAMPLE, TrainedModel, bootstrapped_with_probe, brightened


@pytest.fixture
def probe_env(database_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch, trained_model: TrainedModel):
    return bootstrapped_with_probe(database_url, tmp_path, monkeypatch, trained_model)


def _prediction(settings, decision_id: int) -> db.CostPrediction:
    from shiftcost import pipeline

    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        decision = session.get(db.Decision, decision_id)
        row = session.get(db.CostPrediction, decision.cost_prediction_id)
        session.expunge(row)
        return row


def test_a_probe_runs_when_the_index_interval_straddles_the_budget_and_is_charged_once(probe_env) -> None:
    from sqlalchemy import select

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from tests.store import seed

    settings, landing, trained = probe_env
    x, y = trained.splits["stream"]

    save_batch(Batch(brightened(x[:200]), y[:200], "first"), landing / "first.npz")
    first = pipeline.process_batch(settings, str(landing / "first.npz"), retrain=False)
    index_only = _prediction(settings, first.assessment.decision_id)
    assert index_only.details["stage"] == "index" and index_only.details["probe"] is None
    assert "no budget" in index_only.details["probe_advice"]
    assert first.assessment.forecast_stage == "index" and first.assessment.probe_cost is None
    assert index_only.energy_kwh_lower < index_only.energy_kwh_upper

    # A budget inside the index interval: only the probe can tell which side the batch is on.
    cap = math.sqrt(index_only.energy_kwh_lower * index_only.energy_kwh_upper)
    with pipeline.connect(settings) as database:
        seed.committed(database).create_budget("probe-test", period="per_run", kwh_cap=cap)
    save_batch(Batch(brightened(x[1:201]), y[1:201], "second"), landing / "second.npz")
    second = pipeline.process_batch(settings, str(landing / "second.npz"), retrain=False)
    decision_id = second.assessment.decision_id
    staged = _prediction(settings, decision_id)
    assert staged.details["stage"] == "probe", staged.details["probe_advice"]
    probe = staged.details["probe"]
    # The outcome `shiftcost assess` prints says which stage decided, why, and what the probe spent.
    assert second.assessment.forecast_stage == "probe" and second.assessment.probe_advice == staged.details["probe_advice"]
    assert second.assessment.probe_cost == probe["cost"]
    holdout = round(200 * 0.3)
    # Two steps of four samples; three evaluations of the holdout, each a third of a training sample's cost.
    assert probe["cost"]["steps"] == 2 and probe["cost"]["sample_gradients"] == 8 and probe["cost"]["samples_evaluated"] == 3 * holdout
    assert probe["settings"]["lr"] == PROBE["lr"] and probe["settings"]["optimizer"] == PROBE["optimizer"]
    # Measured with CodeCarbon like a retrain, with the host rate's estimate kept beside it.
    assert probe["cost"]["estimated_energy_kwh"] == pytest.approx(PROBE_JOULES_PER_SAMPLE * (8 + 3 * holdout / 3.0) / 3.6e6)
    assert probe["cost"]["energy_measured"] is True and probe["cost"]["seconds"] > 0
    probe_kwh = probe["cost"]["energy_kwh"]
    assert probe_kwh > 0
    assert "curve_log_epochs" in staged.details["prediction"]["features"]
    # The decision used the probe stage's figures, not the index model's.
    assert staged.epochs != pytest.approx(probe["index_prediction"]["epochs"])

    with pipeline.connect(settings) as database:
        with database.session(readonly=True) as session:
            entries = session.scalars(
                select(db.LedgerEntry).join(db.Budget, db.Budget.id == db.LedgerEntry.budget_id)
                .where(db.LedgerEntry.decision_id == decision_id, db.Budget.name == "probe-test")
            ).all()  # fmt: skip
            charged = [e for e in entries if e.kind == "settle" and "probe" in (e.reason or "")]
            assert len(charged) == 1 and charged[0].energy_kwh == pytest.approx(probe_kwh)
        # Counted once: the per-run budget of this decision has the cap less the probe left
        # (a retrain reservation, if any, was released: this assessment runs no retrain).
        left = seed.committed(database).remaining("probe-test", decision_id=decision_id).remaining_kwh
        assert left == pytest.approx(cap - probe_kwh)


def test_the_share_of_the_budget_a_probe_may_cost_is_the_settings(probe_env) -> None:
    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from tests.store import seed

    settings, landing, trained = probe_env
    x, y = trained.splits["stream"]
    save_batch(Batch(brightened(x[:200]), y[:200], "first"), landing / "first.npz")
    first = _prediction(settings, pipeline.process_batch(settings, str(landing / "first.npz"), retrain=False).assessment.decision_id)
    cap = math.sqrt(first.energy_kwh_lower * first.energy_kwh_upper)
    with pipeline.connect(settings) as database:
        seed.committed(database).create_budget("probe-test", period="per_run", kwh_cap=cap)
    # The probe's full price on a batch of 200, as the rate prices it (two steps of four, three evaluations).
    probe_kwh = PROBE_JOULES_PER_SAMPLE * (8 + 3 * round(200 * 0.3) / 3.0) / 3.6e6
    assert probe_kwh < settings.probe_max_share * cap  # the default share lets it run (the test above)
    stingy = settings.model_copy(update={"probe_max_share": 0.9 * probe_kwh / cap})
    save_batch(Batch(brightened(x[1:201]), y[1:201], "second"), landing / "second.npz")
    second = pipeline.process_batch(stingy, str(landing / "second.npz"), retrain=False).assessment
    assert second.forecast_stage == "index" and second.probe_cost is None
    assert "the probe would cost more than" in second.probe_advice


def test_no_probe_runs_where_calibration_forecast_its_batches_no_better_with_one(
    database_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch, trained_model: TrainedModel
) -> None:
    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from tests.store import seed

    left_out = {"probe": {"mdape_epochs": 0.85}, "index": {"mdape_epochs": 0.66}}
    settings, landing, trained = bootstrapped_with_probe(database_url, tmp_path, monkeypatch, trained_model, left_out)
    x, y = trained.splits["stream"]
    save_batch(Batch(brightened(x[:200]), y[:200], "first"), landing / "first.npz")
    first = _prediction(settings, pipeline.process_batch(settings, str(landing / "first.npz"), retrain=False).assessment.decision_id)
    # The budget straddles the index interval, where a probe would otherwise run.
    with pipeline.connect(settings) as database:
        seed.committed(database).create_budget("probe-test", period="per_run", kwh_cap=math.sqrt(first.energy_kwh_lower * first.energy_kwh_upper))
    save_batch(Batch(brightened(x[1:201]), y[1:201], "second"), landing / "second.npz")
    second = pipeline.process_batch(settings, str(landing / "second.npz"), retrain=False).assessment
    assert second.forecast_stage == "index" and second.probe_cost is None
    assert "no better with the probe (MdAPE of epochs 85%) than with the indices alone (66%)" in second.probe_advice


def test_a_cost_model_calibrated_at_another_retrain_batch_size_is_refused_before_any_decision(probe_env, monkeypatch) -> None:
    from sqlalchemy import func, select

    from shiftcost import pipeline
    from shiftcost.config import load_settings
    from shiftcost.data import Batch, save_batch
    from shiftcost.errors import ConfigError

    _, landing, trained = probe_env
    # Calibrated on retrains at batch 64 (the forecaster's); the pipeline now retrains at 32.
    monkeypatch.setenv("SHIFTCOST_RETRAIN_BATCH_SIZE", "32")
    settings = load_settings()
    x, y = trained.splits["stream"]
    save_batch(Batch(brightened(x[:200]), y[:200], "other-batch-size"), landing / "other.npz")
    with pytest.raises(ConfigError, match=r"calibrated on retrains with batch_size 64 \(here 32\), not what the pipeline"):
        pipeline.process_batch(settings, str(landing / "other.npz"), retrain=False)
    with pipeline.connect(settings) as database, database.session(readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(db.Decision)) == 0


def test_a_refit_after_a_real_retrain_keeps_the_probe_stage_and_the_calibrated_recipe(probe_env) -> None:
    import json

    from shiftcost import pipeline
    from shiftcost.data import Batch, save_batch
    from shiftcost.pipeline.common import load_forecaster
    from shiftcost.store import repository

    settings, landing, trained = probe_env
    architecture = trained.spec.architecture

    def newest() -> tuple[db.Calibration, object]:
        with pipeline.connect(settings) as database, database.session(readonly=True) as session:
            row = repository.latest_calibration(session, architecture, model_name=settings.model_name)
            session.expunge(row)
            return row, load_forecaster(session, architecture, model_name=settings.model_name, image_size=trained.spec.shape_key, batch_size=64)

    registered, before = newest()
    x, y = trained.splits["stream"]
    save_batch(Batch(brightened(x[:200]), y[:200], "first"), landing / "first.npz")
    done = pipeline.process_batch(settings, str(landing / "first.npz"))
    assert done.retraining is not None and done.retraining.epochs is not None, done.to_dict()
    refit, after = newest()
    # Stage 0 learned the run; the probe stage, its probes and the recipe it was calibrated on stay.
    assert (refit.source, refit.n_points, refit.version) == ("refit", registered.n_points + 1, registered.version + 1)
    assert after.stage0.history_.latest.version == before.stage0.history_.latest.version + 1
    assert after.stage1 is not None and json.loads(after.stage1.to_json()) == json.loads(before.stage1.to_json())
    assert after.probe_options() == before.probe_options() == before.probe_options() | PROBE
    assert (after.retrain_settings, after.left_out, after.max_epochs) == (before.retrain_settings, before.left_out, before.max_epochs)
