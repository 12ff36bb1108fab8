"""Repositories: models, batches (registered once, even when racing), assessment and retrain rows."""

from __future__ import annotations

import functools
import threading
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import exc, func, select

from shiftcost.errors import InputError
from shiftcost.store import repository as repo
from shiftcost.store.errors import NotFoundError
from shiftcost.store.models import Batch, Model, RetrainRun

from . import seed


def test_model_versions_count_up_per_name(db) -> None:
    with db.session() as session:
        first = repo.register_model(session, "digits", "small-cnn", layers=["fc1"], classes=[0, 1])
        second = repo.register_model(session, "digits", "small-cnn", parent_id=first.id)
        other = repo.register_model(session, "mnist", "small-cnn")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    with db.session(readonly=True) as session:
        assert repo.get_model(session, "digits").id == second.id
        assert repo.get_model(session, "digits", 1).classes == [0, 1]
        assert repo.get_model(session, "digits").parent.id == first.id
        with pytest.raises(NotFoundError, match="No model digits version 9"):
            repo.get_model(session, "digits", 9)


def test_duplicate_model_version_is_refused_by_the_database(db) -> None:
    with db.session() as session:
        repo.register_model(session, "digits", "small-cnn", version=1)
    with pytest.raises(exc.IntegrityError), db.session() as session:
        repo.register_model(session, "digits", "small-cnn", version=1)
    with db.session(readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 1


def test_register_batch_once_per_model_name(db) -> None:
    with db.session() as session:
        v1 = seed.model(session)
        v2 = repo.register_model(session, "digits", "small-cnn", parent_id=v1.id)
        other = seed.model(session, name="other")
        batch, created = repo.register_batch(session, v1.id, "file:///a.npz", "f1", 64, True)
        again, created_again = repo.register_batch(session, v2.id, "file:///copy-of-a.npz", "f1", 64, True)
        elsewhere, created_elsewhere = repo.register_batch(session, other.id, "file:///a.npz", "f1", 64, False)
    assert created and not created_again and created_elsewhere
    assert again.id == batch.id and again.source_uri == "file:///a.npz"  # first registration kept
    assert elsewhere.id != batch.id
    assert batch.status == "registered" and batch.registered_at.tzinfo is not None


def test_racing_batch_registration_creates_exactly_one_row(database_url: str) -> None:
    from shiftcost.store import open_database

    database = open_database(database_url, pool_size=16, max_overflow=4)
    try:
        with database.session() as session:
            model_id = seed.model(session).id
        for round_number in range(5):
            barrier = threading.Barrier(16)
            results: list[object] = [None] * 16

            def register(i: int, fingerprint: str = f"race-{round_number}") -> None:
                barrier.wait()
                try:
                    with database.session() as session:
                        batch, created = repo.register_batch(
                            session, model_id, f"file:///{i}.npz", fingerprint, 10, True)
                        results[i] = (batch.id, created)
                except Exception as error:  # asserted on below
                    results[i] = error

            threads = [threading.Thread(target=register, args=(i,)) for i in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert all(isinstance(r, tuple) for r in results), results
            assert sum(created for _, created in results) == 1
            assert len({batch_id for batch_id, _ in results}) == 1
            with database.session(readonly=True) as session:
                count = session.scalar(
                    select(func.count()).select_from(Batch).where(Batch.fingerprint == f"race-{round_number}"))
            assert count == 1
    finally:
        database.dispose()


def test_batch_status_changes(db) -> None:
    with db.session() as session:
        batch = seed.batch(session, seed.model(session))
        with pytest.raises(InputError, match="needs a failure reason"):
            repo.set_batch_status(session, batch.id, "failed")
        with pytest.raises(InputError, match="Unknown batch status"):
            repo.set_batch_status(session, batch.id, "lost")
        repo.set_batch_status(session, batch.id, "failed", "cannot read file")
    with db.session() as session:
        assert repo.get_batch(session, batch.id).failure_reason == "cannot read file"
        repo.set_batch_status(session, batch.id, "assessing")
    with db.session(readonly=True) as session:
        stored = repo.get_batch(session, batch.id)
        assert (stored.status, stored.failure_reason) == ("assessing", None)


def test_a_failing_transaction_leaves_nothing_half_written(db) -> None:
    with pytest.raises(InputError), db.session() as session:
        model = seed.model(session)
        seed.batch(session, model)
        repo.record_decision(session, seed.batch(session, model).id, "retrain", [])  # no reason: refused
    with db.session(readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 0
        assert session.scalar(select(func.count()).select_from(Model)) == 0


def test_assessment_chain_round_trips(db) -> None:
    with db.session() as session:
        model = seed.model(session)
        stats = repo.add_reference_stats(session, model.id, "file:///ref.safetensors", "r1", 1797, accuracy=0.97)
        batch = seed.batch(session, model)
        repo.add_drift_report(session, batch.id, "mmd", "embeddings", True, score=np.float64(0.31),
                              threshold=0.1, details={"p": [0.01, 0.2]}, html_uri="file:///r.html")
        run = repo.add_index_run(session, batch.id, model.id, np.int64(100), reference_stats_id=stats.id,
                                 resque_dist=np.float32(1.5), inv_ari=0.2, device="cpu", seconds=0.4)
        prediction = repo.add_cost_prediction(session, run.id, 2.5, 0.01, 0.004, energy_kwh_lower=0.005,
                                              energy_kwh_upper=0.02, interval_level=0.9)
        decision = repo.record_decision(session, batch.id, "skip", ["over budget 'day'"],
                                        cost_prediction_id=prediction.id, blocked_by_budget=True,
                                        budget_state=[{"name": "day", "remaining_kwh": 0.001}],
                                        policy={"use_upper_bound": True})
    with db.session(readonly=True) as session:
        stored = repo.latest_decision(session, batch.id)
        assert stored.id == decision.id and stored.model_id == model.id
        assert stored.reasons == ["over budget 'day'"]
        assert stored.budget_state == [{"name": "day", "remaining_kwh": 0.001}]
        assert stored.cost_prediction.energy_kwh_upper == 0.02
        assert repo.latest_reference_stats(session, model.id).accuracy == 0.97
    with pytest.raises(TypeError, match="no settable column 'resque'"), db.session() as session:
        repo.add_index_run(session, batch.id, model.id, 10, resque=1.0)


def test_retrain_run_lifecycle(db) -> None:
    with db.session() as session:
        decision = seed.decision(session)
        run = repo.start_retrain_run(session, decision.batch.model_id, decision_id=decision.id,
                                     batch_id=decision.batch_id, target_accuracy=0.9)
        run_id = run.id
    assert run.status == "running" and run.finished_at is None
    with db.session() as session:
        with pytest.raises(InputError, match="Unknown retrain status"):
            repo.finish_retrain_run(session, run_id, "done")
        repo.finish_retrain_run(session, run_id, "cap_reached", epochs=3.25, steps=130, reached_cutoff=False,
                                energy_kwh=0.002, emissions_kg=0.0007, energy_method="estimated",
                                grad_norms=[1.0, 0.5], param_change_per_layer={"fc1": 0.01})
    with db.session(readonly=True) as session:
        stored = session.get(RetrainRun, run_id)
        assert (stored.status, stored.epochs, stored.reached_cutoff) == ("cap_reached", 3.25, False)
        assert stored.finished_at >= stored.started_at
        assert stored.grad_norms == [1.0, 0.5]


def test_calibration_versions_and_energy_probes(db) -> None:
    with db.session() as session:
        first = repo.add_calibration(session, "small-cnn", "sweep", {"x": [1, 2]}, {"a": 1.0}, n_points=2,
                                     loo_error=0.3)
        second = repo.add_calibration(session, "small-cnn", "refit", {"x": [1, 2, 3]}, {"a": 1.1}, n_points=3,
                                      loo_error=0.2)
        other = repo.add_calibration(session, "resnet", "sweep", {}, {}, n_points=0)
        with pytest.raises(InputError):
            repo.add_calibration(session, "small-cnn", "guess", {}, {}, n_points=0)
        repo.add_energy_probe(session, "small-cnn", "cpu:x", "1x8x8", 0.5,
                              measured_at=datetime(2025, 1, 1, tzinfo=UTC))
        repo.add_energy_probe(session, "small-cnn", "cpu:x", "1x8x8", 0.7)
        with pytest.raises(InputError, match="non-negative"):
            repo.add_energy_probe(session, "small-cnn", "cpu:x", "1x8x8", -1.0)
    assert (first.version, second.version, other.version) == (1, 2, 1)
    with db.session(readonly=True) as session:
        assert repo.latest_calibration(session, "small-cnn", model_name=None).id == second.id
        assert [c.version for c in repo.calibration_history(session, "small-cnn")] == [1, 2]
        assert repo.latest_energy_probe(session, "small-cnn", "cpu:x").joules_per_sample_epoch == 0.7
        assert repo.latest_energy_probe(session, "small-cnn", "gpu:y") is None


def test_a_model_uses_its_own_calibrations_or_its_architectures_never_another_models(db) -> None:
    with db.session() as session:
        digits = seed.model(session, "digits", "small-cnn")
        digits_v2 = seed.model(session, "digits", "small-cnn", parent_id=digits.id)
        sibling = seed.model(session, "sibling", "small-cnn")
        seed.model(session, "stranger", "small-cnn")
        add = functools.partial(repo.add_calibration, session, "small-cnn", "sweep", {}, {}, n_points=1)
        whole = add()  # stored for the architecture as a whole, by no model
        digits_own = add(model_id=digits.id)
        digits_refit = add(model_id=digits_v2.id)  # a later version of the same model
        sibling_own = add(model_id=sibling.id)
    with db.session(readonly=True) as session:
        newest = functools.partial(repo.latest_calibration, session, "small-cnn")
        assert newest(model_name="digits").id == digits_refit.id != digits_own.id
        assert newest(model_name="sibling").id == sibling_own.id
        assert newest(model_name="stranger").id == whole.id  # no calibration of its own yet
        assert newest(model_name=None).id == sibling_own.id  # the architecture's history, any model
        assert repo.latest_calibration(session, "resnet", model_name="digits") is None


def test_timestamps_are_stored_and_returned_in_utc(db) -> None:
    moment = datetime(2025, 7, 1, 2, 30, tzinfo=timezone(timedelta(hours=2)))
    with db.session() as session:
        run = repo.start_retrain_run(session, seed.model(session).id, started_at=moment)
        run_id = run.id
    with db.session(readonly=True) as session:
        stored = session.get(RetrainRun, run_id).started_at
    assert stored == moment
    assert stored.utcoffset() == timedelta(0)
    assert (stored.hour, stored.day) == (0, 1)


def test_json_columns_take_numpy_values_and_non_finite_numbers(db) -> None:
    with db.session() as session:
        batch = seed.batch(session, seed.model(session))
        report = repo.add_drift_report(
            session, batch.id, "ks", "image_stats", False,
            details={"p_values": np.array([0.5, 0.25]), "score": np.float32(0.5), "bad": float("nan"),
                     "when": datetime(2025, 1, 1, tzinfo=UTC), "shape": (8, 8)},
        )
        report_id = report.id
    with db.session(readonly=True) as session:
        from shiftcost.store.models import DriftReport

        stored = session.get(DriftReport, report_id).details
    assert stored == {"p_values": [0.5, 0.25], "score": 0.5, "bad": None,
                      "when": "2025-01-01T00:00:00+00:00", "shape": [8, 8]}
