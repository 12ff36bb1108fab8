"""How the pipeline prices a retrain before deciding: its evaluations included, never past its cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shiftcost.energy import HostEnergyRate
from shiftcost.forecast.price import RetrainPrice

# One kWh per sample-gradient, and 5 kWh a run, keep the figures countable by hand.
KWH = 3.6e6
RATE = HostEnergyRate(KWH, 0.0, 1, overhead_joules=5 * KWH)


def test_a_retrain_is_priced_at_its_evaluations_and_never_beyond_its_cap() -> None:
    # 140 samples at batch 32: 4 full steps and a trailing 12, so 5 steps an epoch, an evaluation after every step.
    price = RetrainPrice(pool=140, holdout=60, batch_size=32, rate=RATE, cap_epochs=20.0)
    # No training: the run's overhead and one evaluation of the 60 held-out samples, each a third of a sample-gradient.
    assert price.kwh(0.0) == pytest.approx(5 + 60 / 3)
    # Two epochs: 280 samples trained, 10 steps and 11 evaluations, and the overhead once.
    assert price.kwh(2.0) == pytest.approx(5 + 280 + 11 * 60 / 3)
    # The run stops at its 20-epoch cap: 2,800 samples, 100 steps, 101 evaluations, whatever the forecast says.
    assert price.kwh(249.0) == price.kwh(math.inf) == pytest.approx(5 + 2800 + 101 * 60 / 3)
    # Without a cap an unbounded forecast stays unbounded.
    assert RetrainPrice(140, 60, 32, RATE, None).kwh(math.inf) == math.inf


@given(st.floats(0, 60), st.floats(0, 60), st.integers(2, 500), st.integers(1, 200), st.integers(1, 64))
def test_more_epochs_never_cost_less_and_none_past_the_cap_cost_more(a: float, b: float, pool: int, holdout: int, batch: int) -> None:
    price = RetrainPrice(pool, holdout, batch, RATE, cap_epochs=15.0)
    low, high = sorted((a, b))
    assert price.kwh(low) <= price.kwh(high) <= price.kwh(15.0)
    assert price.kwh(0.0) > 0


def test_a_probe_is_priced_at_its_full_length_and_at_most_its_capped_holdout() -> None:
    price = RetrainPrice(pool=140, holdout=60, batch_size=32, rate=RATE, cap_epochs=20.0)
    # Sixteen steps of sixteen, seventeen evaluations of the 60 held-out images, the overhead once.
    assert price.probe_kwh({"steps": 16, "batch_size": 16}) == pytest.approx(5 + 256 + 17 * 60 / 3)
    assert price.probe_kwh({"steps": 16, "batch_size": 16, "max_holdout": 12}) == pytest.approx(5 + 256 + 17 * 12 / 3)
    assert price.probe_kwh({"steps": 16, "batch_size": 16, "max_holdout": 512}) == price.probe_kwh({"steps": 16, "batch_size": 16})


def test_a_run_under_way_is_priced_at_what_it_trained_and_evaluated() -> None:
    price = RetrainPrice(pool=140, holdout=60, batch_size=32, rate=RATE, cap_epochs=20.0)
    # Before any step: the overhead and the first evaluation.
    assert price.spent_kwh(0, 1) == pytest.approx(5 + 60 / 3)
    # 96 samples trained (three steps of 32) and four evaluations.
    assert price.spent_kwh(96, 4) == pytest.approx(5 + 96 + 4 * 60 / 3)


@given(st.integers(0, 40), st.integers(2, 500), st.integers(1, 200), st.integers(1, 64))
def test_a_whole_epochs_run_priced_under_way_costs_what_it_was_priced_at_before(epochs: int, pool: int, holdout: int, batch: int) -> None:
    from shiftcost.forecast import protocol

    price = RetrainPrice(pool, holdout, batch, RATE, cap_epochs=None)
    evaluations = protocol.evaluations(epochs, protocol.steps_per_epoch(pool, batch))
    assert price.spent_kwh(epochs * pool, evaluations) == pytest.approx(price.kwh(epochs))
