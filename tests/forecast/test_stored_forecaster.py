"""The forecaster's probe stage travels with the cost model into the database and back."""

from __future__ import annotations

import json

from shiftcost.forecast.probe import PROBE_FEATURES
from shiftcost.pipeline.bootstrap import _forecaster_beside
from shiftcost.pipeline.common import load_forecaster, store_cost_model
from shiftcost.store import open_database, repository
from tests.forecast.helpers import INDEX, fitted_forecaster, forecast_rows


def test_a_stored_forecaster_predicts_its_probe_stage_exactly_as_the_fitted_one(tmp_path) -> None:
    fitted = fitted_forecaster()
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}", upgrade=True)
    try:
        with database.session() as session:
            store_cost_model(session, "digits_cnn", fitted.stage0, source="sweep", forecaster=fitted)
        with database.session() as session:
            assert load_forecaster(session, "digits_cnn", model_name="digits", image_size="1x8x8", batch_size=32).energy_rate == fitted.energy_rate
            repository.add_energy_probe(session, "digits_cnn", "here", "1x8x8", 2.0)
        with database.session(readonly=True) as session:
            loaded = load_forecaster(session, "digits_cnn", model_name="digits", image_size="1x8x8", batch_size=32)
    finally:
        database.dispose()
    # The batch calibration retrained at is stored and wins over the caller's stand-in.
    assert loaded is not None and loaded.stage1 is not None and loaded.batch_size == 16
    # The newest energy probe prices, so the guard and the assessment agree.
    assert loaded.energy_rate is not None and loaded.energy_rate.joules_per_sample == 2.0
    row = forecast_rows(seed=5)[3]
    probe_row = {name: row[name] for name in INDEX} | {"stage0_log_epochs": fitted.stage0_log_epochs(row)}
    probe_row |= {name: row[name] for name in PROBE_FEATURES}
    assert loaded.stage1.predict([probe_row]) == fitted.stage1.predict([probe_row])


def test_register_reads_the_probe_stage_beside_the_cost_model(tmp_path) -> None:
    fitted = fitted_forecaster()
    (tmp_path / "costmodel.json").write_text(fitted.stage0.to_json())
    assert _forecaster_beside(str(tmp_path), fitted.stage0) is None
    fitted.save(tmp_path / "forecaster.json")
    found = _forecaster_beside(str(tmp_path / "costmodel.json"), fitted.stage0)
    assert found is not None and found.stage0 is fitted.stage0
    assert json.loads(found.stage1.to_json()) == json.loads(fitted.stage1.to_json())


def test_a_rate_fitted_from_measured_runs_is_stored_whole_and_prices_the_pipeline(tmp_path) -> None:
    import dataclasses

    from shiftcost.data.models import build_model
    from shiftcost.pipeline.bootstrap import record_energy_probe

    fitted = fitted_forecaster()
    rate = dataclasses.replace(fitted.energy_rate, joules_per_sample=0.004, overhead_joules=0.6, hardware="here")
    _, spec = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}", upgrade=True)
    try:
        with database.session() as session:
            store_cost_model(session, "digits_cnn", fitted.stage0, source="sweep", forecaster=fitted)
        record_energy_probe(database, spec, rate.joules_per_sample, hardware="here", rate=rate)
        with database.session(readonly=True) as session:
            assert load_forecaster(session, "digits_cnn", model_name="digits", image_size="1x8x8", batch_size=32).energy_rate == rate
        # A probe of training throughput alone has no overhead to carry.
        record_energy_probe(database, spec, 0.003, hardware="here")
        with database.session(readonly=True) as session:
            plain = load_forecaster(session, "digits_cnn", model_name="digits", image_size="1x8x8", batch_size=32).energy_rate
    finally:
        database.dispose()
    assert (plain.joules_per_sample, plain.overhead_joules) == (0.003, 0.0)
