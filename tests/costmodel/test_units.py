"""Epochs to kWh to kg CO2e: exactly the documented linear maps, bounds included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftcost.costmodel import CostModel
from shiftcost.errors import InputError

from . import slow_reference as ref
from .synth import linear_rows

MODEL = CostModel().fit(linear_rows(seed=60, n=25))
X = [{"resque_dist": 0.7, "mean_entropy": 0.3}, {"resque_dist": 0.2, "mean_entropy": 0.9}]
positive = st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(samples=positive, joules=positive, intensity=st.floats(0.0, 2.0, allow_nan=False))
def test_energy_and_emissions_follow_the_formula(samples, joules, intensity):
    for pred in MODEL.predict_costs(X, samples=samples, joules_per_sample_epoch=joules, carbon_intensity=intensity):
        for suffix in ("", "_lower", "_upper"):
            epochs = getattr(pred, "epochs" + suffix)
            kwh = getattr(pred, "energy_kwh" + suffix)
            assert kwh == pytest.approx(ref.energy_kwh(epochs, samples, joules), rel=1e-12)
            assert getattr(pred, "emissions_kg" + suffix) == pytest.approx(kwh * intensity, rel=1e-12, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(samples=positive, joules=positive, intensity=positive, factor=st.sampled_from([2.0, 0.5, 4.0, 0.25]))
def test_doubling_any_factor_scales_energy_and_emissions_exactly(samples, joules, intensity, factor):
    base = MODEL.predict_costs(X, samples=samples, joules_per_sample_epoch=joules, carbon_intensity=intensity)
    for scaled in (
        MODEL.predict_costs(X, samples=samples * factor, joules_per_sample_epoch=joules, carbon_intensity=intensity),
        MODEL.predict_costs(X, samples=samples, joules_per_sample_epoch=joules * factor, carbon_intensity=intensity),
    ):
        for b, s in zip(base, scaled):
            # Powers of two scale floating-point products exactly.
            assert (s.energy_kwh, s.energy_kwh_lower, s.energy_kwh_upper) == (
                b.energy_kwh * factor, b.energy_kwh_lower * factor, b.energy_kwh_upper * factor)
            assert s.emissions_kg == b.emissions_kg * factor and s.epochs == b.epochs
    greener = MODEL.predict_costs(X, samples=samples, joules_per_sample_epoch=joules, carbon_intensity=intensity * factor)
    for b, g in zip(base, greener):
        assert g.emissions_kg == b.emissions_kg * factor and g.energy_kwh == b.energy_kwh


def test_per_row_values_and_row_keys():
    rows = [dict(x, samples=s, joules_per_sample_epoch=2.0, carbon_intensity_kg_per_kwh=0.3) for x, s in zip(X, (100, 300))]
    from_rows = MODEL.predict_costs(rows)
    from_args = MODEL.predict_costs(X, samples=[100, 300], joules_per_sample_epoch=2.0, carbon_intensity=[0.3, 0.3])
    assert from_rows == from_args
    assert from_rows[1].energy_kwh == pytest.approx(ref.energy_kwh(from_rows[1].epochs, 300, 2.0), rel=1e-12)


def test_without_hardware_figures_only_epochs_are_predicted():
    pred = MODEL.predict_costs(X[:1])[0]
    assert pred.energy_kwh is None and pred.emissions_kg is None and pred.epochs > 0
    no_grid = MODEL.predict_costs(X[:1], samples=10, joules_per_sample_epoch=1.0)[0]
    assert no_grid.energy_kwh > 0 and no_grid.emissions_kg is None
    with pytest.raises(InputError, match="samples has 3 values for 2 rows"):
        MODEL.predict_costs(X, samples=[1, 2, 3], joules_per_sample_epoch=1.0)
