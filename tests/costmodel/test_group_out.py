"""Leave-one-corruption-out evaluation, checked against fits made by hand through the public API."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from shiftcost.costmodel import CostModel, estimate_joules_per_sample_epoch, leave_one_group_out
from shiftcost.errors import InputError

from .synth import typed_rows


def test_held_out_predictions_equal_a_model_fitted_on_the_other_groups():
    rows = typed_rows(seed=1)
    rows[3] = dict(rows[3], epochs=rows[3]["epochs"] * 1.5, energy_kwh=rows[3]["energy_kwh"] * 2.5)  # odd J in type0
    report = leave_one_group_out(rows, "corruption", alpha=0.5)
    assert len(report.points) == len(rows)
    for held_out in ("type0", "type3"):
        train = [r for r in rows if r["corruption"] != held_out]
        test = [r for r in rows if r["corruption"] == held_out]
        model = CostModel(alpha=0.5).fit(train, groups="corruption")
        joules = float(np.median([r["energy_kwh"] * 3.6e6 / (r["epochs"] * r["samples"]) for r in train]))
        assert joules == pytest.approx(estimate_joules_per_sample_epoch(train))
        expected = model.predict_costs(test, joules_per_sample_epoch=joules)
        got = [p for p in report.points if p["corruption"] == held_out]
        for point, pred, row in zip(got, expected, test):
            assert point["epochs_pred"] == pred.epochs and point["energy_kwh_upper"] == pred.energy_kwh_upper
            assert point["ape_energy"] == pytest.approx(abs(pred.energy_kwh - row["energy_kwh"]) / row["energy_kwh"])
            assert point["energy_covered"] == (pred.energy_kwh_lower <= row["energy_kwh"] <= pred.energy_kwh_upper)


def test_held_out_predictions_are_held_at_the_horizon_before_scoring():
    rows = typed_rows(seed=1)
    raw = leave_one_group_out(rows, "corruption")
    horizon = float(np.median([p["epochs_pred"] for p in raw.points]))
    held = leave_one_group_out(rows, "corruption", horizon_epochs=horizon)
    assert held.summary["horizon_epochs"] == horizon and raw.summary["horizon_epochs"] is None
    assert sum(p["epochs_pred"] > horizon for p in raw.points) >= 5
    for before, after in zip(raw.points, held.points):
        for epochs, energy in (("epochs_pred", "energy_kwh_pred"), ("epochs_upper", "energy_kwh_upper"), ("epochs_lower", "energy_kwh_lower")):
            over = before[epochs] > horizon
            assert after[epochs] == pytest.approx(horizon if over else before[epochs])
            assert after[energy] == pytest.approx(before[energy] * horizon / before[epochs] if over else before[energy])
        if after["ape_epochs"] is not None:
            assert after["ape_epochs"] == pytest.approx(abs(min(before["epochs_pred"], horizon) - after["epochs"]) / after["epochs"])


def test_a_prediction_held_at_a_horizon_keeps_an_unbounded_upper_bound_and_missing_energy():
    pred = CostModel().fit(typed_rows(seed=2)).predict_costs(typed_rows(seed=2)[:1])[0]
    pred = dataclasses.replace(pred, epochs=100.0, epochs_lower=10.0, epochs_upper=math.inf, energy_kwh=2.0, energy_kwh_lower=0.2,
                               energy_kwh_upper=math.inf, emissions_kg=None, emissions_kg_lower=None, emissions_kg_upper=None)
    held = pred.held_at(45.0)
    assert (held.epochs, held.epochs_lower, held.epochs_upper) == (45.0, 10.0, math.inf)
    assert (held.energy_kwh, held.energy_kwh_lower, held.energy_kwh_upper) == (pytest.approx(0.9), 0.2, math.inf)
    assert held.emissions_kg is None and held.features == pred.features


def test_summary_figures_are_medians_and_fractions_of_the_points():
    report = leave_one_group_out(typed_rows(seed=2), "corruption")
    points = report.points
    summary = report.summary
    assert summary["mdape_energy"] == pytest.approx(float(np.median([p["ape_energy"] for p in points])))
    assert summary["coverage_energy"] == pytest.approx(float(np.mean([p["energy_covered"] for p in points])))
    assert summary["coverage_epochs"] == pytest.approx(float(np.mean([p["epochs_covered"] for p in points])))
    assert set(summary["per_group"]) == {f"type{t}" for t in range(5)}
    assert sum(g["n"] for g in summary["per_group"].values()) == len(points)
    assert report.to_dict()["summary"]["level"] == 0.9


def test_a_shared_cost_law_transfers_to_an_unseen_type():
    # Noise 0.15 on log(epochs + 1): a model that generalises across types errs by roughly 10%.
    summary = leave_one_group_out(typed_rows(seed=3), "corruption").summary
    assert summary["mdape_energy"] < 0.25
    assert summary["coverage_energy"] >= 0.8


def test_censored_held_out_runs_are_scored_as_lower_bounds():
    rows = typed_rows(seed=4)
    capped = []
    for r in rows:
        if r["epochs"] > 15:
            r = dict(r, epochs=15.0, reached_cutoff=False, energy_kwh=15.0 * 500 * 3.0 / 3.6e6)
        capped.append(r)
    assert 2 <= sum(not r["reached_cutoff"] for r in capped) <= 10
    report = leave_one_group_out(capped, "corruption")
    censored = [p for p in report.points if p["censored"]]
    assert all(p["ape_energy"] is None and p["epochs_covered"] in (None, False) for p in censored)
    assert report.summary["n_censored"] == len(censored)
    assert report.summary["censored_definite_misses"] == sum(p["epochs_upper"] < p["epochs"] for p in censored)
    assert report.summary["censored_flagged"] == sum(p["predicted_not_to_converge"] for p in censored)


def test_group_out_needs_two_labelled_groups():
    rows = typed_rows(seed=5)
    with pytest.raises(InputError, match="at least 2 values of 'corruption'"):
        leave_one_group_out([dict(r, corruption="same") for r in rows])
    with pytest.raises(InputError, match="needs a 'corruption' value"):
        leave_one_group_out([dict(r, corruption=None) if i == 0 else r for i, r in enumerate(rows)])


def test_joules_estimate_ignores_censored_and_zero_cost_runs():
    rows = [
        {"energy_kwh": 2.0, "epochs": 1.0, "samples": 3.6e6, "reached_cutoff": True},
        {"energy_kwh": 4.0, "epochs": 1.0, "samples": 3.6e6, "reached_cutoff": True},
        {"energy_kwh": 99.0, "epochs": 1.0, "samples": 3.6e6, "reached_cutoff": False},
        {"energy_kwh": 0.001, "epochs": 0.0, "samples": 3.6e6, "reached_cutoff": True},
    ]
    assert estimate_joules_per_sample_epoch(rows) == pytest.approx(3.0)
    with pytest.raises(InputError, match="joules per sample-epoch"):
        estimate_joules_per_sample_epoch(rows[2:])


def test_report_contrasts_unseen_types_with_seen_types():
    rows = typed_rows(seed=6)
    summary = leave_one_group_out(rows, "corruption").summary
    pooled = CostModel().fit(rows).loo_
    assert summary["seen_types_loo"] == pooled and pooled["cv"] == "leave-one-out"


def test_a_fold_that_cannot_be_fitted_is_named_with_its_own_counts():
    rows = typed_rows(seed=3, per_type=4)
    # Every run outside type0 hit the cap: the fold that leaves type0 out has no exact cost to fit on.
    rows = [r if r["corruption"] == "type0" else dict(r, reached_cutoff=False) for r in rows]
    CostModel().fit(rows)  # the whole sweep can be fitted
    with pytest.raises(InputError, match=r"^with corruption 'type0' left out, too few calibration runs .* got 0;"):
        leave_one_group_out(rows, "corruption")
