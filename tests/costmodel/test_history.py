"""Versions: refit direction, old versions untouched, JSON round trip, explanations, flags."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from shiftcost.costmodel import CostModel, CostModelHistory, CostPrediction
from shiftcost.errors import InputError

from .synth import linear_rows

GRID = [{"resque_dist": a, "mean_entropy": b} for a in (0.0, 0.3, 0.6, 0.9) for b in (0.1, 0.8)]


def test_refit_with_costlier_outcomes_raises_predictions_there_and_keeps_the_old_version():
    rows = linear_rows(seed=40, n=30)
    model = CostModel().fit(rows, note="calibration")
    v1 = copy.deepcopy(model.history_.latest)
    before = model.predict_costs(GRID)
    high = {"resque_dist": 0.9, "mean_entropy": 0.5}
    expected_before = model.predict_costs([high])[0].epochs
    rng = np.random.default_rng(1)
    outcomes = [
        {"resque_dist": x, "mean_entropy": 0.5, "epochs": 3.0 * (math.exp(0.4 + 2.0 * x + 0.25) - 1.0), "reached_cutoff": True}
        for x in rng.uniform(0.75, 1.0, 8)
    ]
    outcomes.append({"resque_dist": 0.95, "mean_entropy": 0.5, "epochs": 40.0, "reached_cutoff": False})
    model.refit(outcomes, note="production retrains")

    assert model.version_ == 2 and len(model.history_) == 2
    v2 = model.history_.latest
    assert v2.parent == 1 and v2.note == "production retrains"
    assert len(v2.rows) == len(rows) + len(outcomes) and sum(r["censored"] for r in v2.rows) == 1
    after = model.predict_costs([high])[0]
    assert after.epochs > expected_before
    assert after.epochs_upper > model.predict_costs([high], version=1)[0].epochs_upper
    low = {"resque_dist": 0.05, "mean_entropy": 0.5}  # far from the new outcomes: barely moves
    assert model.predict_costs([low])[0].epochs == pytest.approx(model.predict_costs([low], version=1)[0].epochs, rel=0.5)
    # The old version is unchanged and still predicts exactly what it did.
    assert model.history_.get(1).to_dict() == v1.to_dict()
    assert model.predict_costs(GRID, version=1) == before


def test_refit_needs_the_fitted_features():
    model = CostModel().fit(linear_rows(seed=41, n=20))
    with pytest.raises(InputError, match=r"run 0 has no finite value for \['mean_entropy'\]"):
        model.refit([{"resque_dist": 0.5, "epochs": 2.0, "reached_cutoff": True}])
    assert len(model.history_) == 1


def test_refit_keeps_the_parameters_of_the_version_it_extends():
    model = CostModel(alpha=0.2, level=0.8).fit(linear_rows(seed=42, n=20))
    model.set_params(alpha=5.0)
    model.refit(linear_rows(seed=43, n=3))
    assert model.history_.latest.params["alpha"] == 0.2 and model.history_.latest.params["level"] == 0.8
    assert model.alpha == 5.0


def test_json_round_trip_reproduces_every_version_exactly():
    rows = linear_rows(seed=44, n=25, cap_epochs=6.0)
    model = CostModel(level=0.85).fit(rows, groups=[i % 4 for i in range(25)])
    model.refit(linear_rows(seed=45, n=5, cap_epochs=6.0))
    text = model.to_json()
    json.loads(text)  # plain JSON: no NaN/Infinity tokens
    restored = CostModel.from_json(text)
    for version in (1, 2):
        kwargs = dict(samples=900, joules_per_sample_epoch=3.5, carbon_intensity=0.4, version=version)
        assert restored.predict_costs(GRID, **kwargs) == model.predict_costs(GRID, **kwargs)
        assert restored.explain(GRID[3], version=version) == model.explain(GRID[3], version=version)
    assert restored.get_params() == model.get_params()
    assert restored.to_json() == text
    assert CostModelHistory.from_json(model.history_.to_json()).to_list() == model.history_.to_list()
    np.testing.assert_array_equal(restored.coef_, model.coef_)


def test_a_model_rebuilt_from_stored_version_records_predicts_the_same():
    model = CostModel(alpha=0.4).fit(linear_rows(seed=55, n=20))
    model.refit(linear_rows(seed=56, n=4))
    stored = [json.loads(json.dumps(v.to_dict())) for v in reversed(model.history_.versions)]  # any order
    rebuilt = CostModel.from_versions(stored)
    assert rebuilt.version_ == 2 and rebuilt.alpha == 0.4
    for version in (1, 2):
        assert rebuilt.predict_costs(GRID, version=version) == model.predict_costs(GRID, version=version)


def test_from_json_rejects_foreign_payloads():
    with pytest.raises(InputError, match="not valid JSON"):
        CostModel.from_json("{")
    with pytest.raises(InputError, match="format"):
        CostModel.from_json('{"format": "other"}')


def test_version_records_data_parameters_and_held_out_error():
    rows = linear_rows(seed=46, n=20)
    model = CostModel(alpha=0.5).fit(rows)
    record = model.history_.latest.to_dict()
    assert record["version"] == 1 and record["parent"] is None and record["created_at"].endswith("+00:00")
    assert record["params"]["alpha"] == 0.5
    assert [r["x"]["resque_dist"] for r in record["rows"]] == [r["resque_dist"] for r in rows]
    assert record["rows"][0]["meta"]["true_epochs"] == rows[0]["true_epochs"]
    assert set(record["loo"]) >= {"mdape_epochs", "coverage", "n", "n_censored", "cv"}
    with pytest.raises(InputError, match="version 7 does not exist"):
        model.predict_costs(GRID, version=7)


def test_explain_contributions_add_up_to_the_prediction():
    rows = [dict(r, inv_ari=0.5 * r["resque_dist"] + 0.1 * i % 3) for i, r in enumerate(linear_rows(seed=47, n=25))]
    model = CostModel(monotone=False).fit(rows)
    x = {"resque_dist": 0.8, "inv_ari": 0.2, "mean_entropy": 0.4}
    explanation = model.explain(x)
    assert explanation["baseline"] + sum(explanation["contributions"].values()) == pytest.approx(explanation["log_epochs"])
    assert explanation["epochs"] == pytest.approx(model.predict_costs([x])[0].epochs, rel=1e-12)
    at_mean = model.explain(explanation["feature_mean"])
    assert all(abs(c) < 1e-12 for c in at_mean["contributions"].values())
    assert at_mean["log_epochs"] == pytest.approx(explanation["baseline"])
    for name, coefficient in explanation["coefficients"].items():
        assert explanation["contributions"][name] == pytest.approx(coefficient * (x[name] - explanation["feature_mean"][name]))


def test_runs_beyond_the_cap_are_predicted_not_to_converge():
    rows = linear_rows(seed=48, n=40, slopes=(3.0, 0.0), noise=0.2, cap_epochs=5.0)
    model = CostModel(features=["resque_dist"]).fit(rows)
    assert model.cap_epochs_ == 5.0
    far, near = model.predict_costs([{"resque_dist": 1.2}, {"resque_dist": 0.1}])
    assert far.predicted_not_to_converge and far.p_not_converge > 0.5 and far.max_epochs == 5.0
    assert not near.predicted_not_to_converge and near.p_not_converge < 0.01
    relaxed = model.predict_costs([{"resque_dist": 1.2}], max_epochs=1000.0)[0]
    assert not relaxed.predicted_not_to_converge and relaxed.epochs == far.epochs
    uncapped = CostModel(features=["resque_dist"]).fit(linear_rows(seed=48, n=40))
    pred = uncapped.predict_costs([{"resque_dist": 1.2}])[0]
    assert pred.max_epochs is None and pred.p_not_converge is None and not pred.predicted_not_to_converge


def test_prediction_serialises_to_plain_json():
    model = CostModel().fit(linear_rows(seed=49, n=20))
    pred = model.predict_costs(GRID[:1], samples=100, joules_per_sample_epoch=1.0, carbon_intensity=0.2)[0]
    assert isinstance(pred, CostPrediction)
    data = json.loads(json.dumps(pred.to_dict(), allow_nan=False))
    assert data["model_version"] == 1 and data["level"] == 0.9
    assert data["epochs_lower"] <= data["epochs"] <= data["epochs_upper"]
    assert data["features"] == GRID[0]


def test_predictions_outside_the_fitted_range_name_the_features():
    rows = linear_rows(seed=50, n=20)
    model = CostModel().fit(rows)
    inside, outside = model.predict_costs([{"resque_dist": 0.5, "mean_entropy": 0.5}, {"resque_dist": 1.5, "mean_entropy": -0.1}])
    assert inside.extrapolated == [] and outside.extrapolated == ["resque_dist", "mean_entropy"]
    assert outside.to_dict()["extrapolated"] == ["resque_dist", "mean_entropy"]


def test_refit_groups_new_runs_by_the_same_key():
    rows = [dict(r, corruption=f"c{i % 3}") for i, r in enumerate(linear_rows(seed=51, n=24))]
    model = CostModel().fit(rows, groups="corruption")
    assert model.loo_["cv"] == "leave-one-group-out (3 groups)"
    new = [dict(r, corruption="c3") for r in linear_rows(seed=52, n=4)] + [linear_rows(seed=53, n=1)[0]]
    model.refit(new)
    latest = model.history_.latest
    assert latest.group_key == "corruption" and latest.rows[-1]["group"] is None
    assert model.loo_["cv"] == "leave-one-group-out (4 groups)"
    folds = latest.state["fold_of_row"]
    assert len(set(folds)) == 5 and folds[-2] != folds[-1]  # the ungrouped run is a fold of its own


def test_estimator_contract_fit_resets_and_unfitted_raises_not_fitted() -> None:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    from shiftcost.errors import InputError

    model = CostModel()
    with pytest.raises(NotFittedError):
        check_is_fitted(model)
    with pytest.raises(NotFittedError) as caught:
        model.predict_costs([{"resque_dist": 0.1, "mean_entropy": 0.2}])
    assert isinstance(caught.value, InputError)  # still one sentence on the command line
    model.fit(linear_rows(seed=61, n=20))
    check_is_fitted(model)
    model.refit(linear_rows(seed=62, n=3))
    assert model.version_ == 2
    model.fit(linear_rows(seed=63, n=20))  # starts afresh, like any scikit-learn estimator
    assert model.version_ == 1 and len(model.history_) == 1
