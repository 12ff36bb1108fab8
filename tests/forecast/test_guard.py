"""The budget guard inside a real retrain: stops, status, model unchanged, spend reported."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from shiftcost.energy import EVAL_SAMPLE_WEIGHT
from shiftcost.forecast.forecaster import Forecast, Interval
from shiftcost.forecast.guard import STOPPED_BY_BUDGET, BudgetGuard
from shiftcost.retrain import STATUSES, retrain_to_cutoff
from tests.forecast.helpers import fitted_forecaster

N = 400


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    x = torch.randn(N, 8, generator=g)
    y = (x @ w > 0).long()
    model = nn.Linear(8, 2)
    with torch.no_grad():  # starts out predicting the opposite class: it must learn
        model.weight.copy_(torch.stack([w, -w]) * 0.5)
        model.bias.zero_()
    return model, x, y


def run(guard: BudgetGuard | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_epochs: float = 20):
    return retrain_to_cutoff(
        model, x, y, target_accuracy=0.95, holdout_fraction=0.3, eval_every=2, batch_size=16, lr=0.02, optimizer="sgd",
        max_epochs=max_epochs, track_energy=False, progress=guard, device="cpu",
    )


def test_a_forecast_beyond_the_budget_stops_before_training_and_keeps_the_model() -> None:
    model, x, y = task()
    before = copy.deepcopy(model.state_dict())
    pessimistic = Forecast(Interval(50.0, 40.0, 80.0, 0.9), None, None, "probe", False, None, {})
    budget = 1000.0  # sample counts: one evaluation costs 120 / 3 = 40, 40 epochs cost far more
    guard = BudgetGuard(fitted_forecaster(), budget_kwh=budget, batch_samples=N, ceiling=0.97, initial=pessimistic)
    result = run(guard, model, x, y)
    assert result.status == STOPPED_BY_BUDGET and STOPPED_BY_BUDGET in STATUSES
    assert not result.reached_cutoff and result.steps == 0
    assert guard.spent_kwh == pytest.approx(EVAL_SAMPLE_WEIGHT * 120) and guard.spent_kwh < budget
    assert "beyond the budget" in guard.reason
    # Written in flight, before any measured figure exists: the spend it names is the rate's price.
    assert f"({guard.spent_kwh:.3g} kWh spent at the energy rate's price)" in guard.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_spending_past_the_budget_stops_within_one_evaluation_interval() -> None:
    model, x, y = task()
    unguarded = run(None, model, x, y)
    assert unguarded.status == "reached" and unguarded.steps > 6
    budget = 150.0
    guard = BudgetGuard(fitted_forecaster(), budget_kwh=budget, batch_samples=N, ceiling=0.97)
    result = run(guard, model, x, y)
    assert result.status == STOPPED_BY_BUDGET and 0 < result.steps < unguarded.steps
    expected = result.samples_seen + EVAL_SAMPLE_WEIGHT * len(result.curve) * result.holdout_samples
    assert guard.spent_kwh == pytest.approx(expected)
    interval = 2 * 16 + EVAL_SAMPLE_WEIGHT * result.holdout_samples
    assert guard.spent_kwh <= budget + interval
    assert guard.forecasts and guard.forecasts[-1]["step"] == result.steps


def test_an_ample_budget_changes_nothing() -> None:
    model, x, y = task()
    plain = run(None, model, x, y)
    guarded = run(BudgetGuard(fitted_forecaster(), budget_kwh=1e9, batch_samples=N, ceiling=0.97), model, x, y)
    assert guarded.status == plain.status == "reached"
    assert guarded.steps == plain.steps and [p.accuracy for p in guarded.curve] == [p.accuracy for p in plain.curve]


def test_without_any_forecast_the_guard_stops_once_the_spend_passes_the_budget() -> None:
    model, x, y = task()
    unguarded = run(None, model, x, y)
    index_only = fitted_forecaster()
    index_only.stage1 = None  # no probe stage and no initial forecast: nothing to forecast with
    budget = 150.0
    guard = BudgetGuard(index_only, budget_kwh=budget, batch_samples=N, ceiling=0.97)
    result = run(guard, model, x, y)
    assert result.status == STOPPED_BY_BUDGET and 0 < result.steps < unguarded.steps
    interval = 2 * 16 + EVAL_SAMPLE_WEIGHT * result.holdout_samples
    # It stopped at the first evaluation past the budget, not before.
    assert budget < guard.spent_kwh <= budget + interval
    assert "beyond the budget" in guard.reason and not guard.forecasts
    assert f"has spent {guard.spent_kwh:.3g} kWh at the energy rate's price" in guard.reason


def test_the_run_overhead_is_charged_once_at_the_start_and_never_to_the_epochs_still_to_come() -> None:
    import dataclasses

    from tests.forecast.helpers import UNIT_RATE

    pessimistic = Forecast(Interval(50.0, 40.0, 80.0, 0.9), None, None, "probe", False, None, {})
    guards = {}
    for overhead in (0.0, 500.0):
        forecaster = fitted_forecaster()
        forecaster.energy_rate = dataclasses.replace(UNIT_RATE, overhead_joules=overhead * 3.6e6)
        model, x, y = task()
        guards[overhead] = BudgetGuard(forecaster, budget_kwh=1000.0, batch_samples=N, ceiling=0.97, initial=pessimistic)
        run(guards[overhead], model, x, y)
    plain, with_overhead = guards[0.0], guards[500.0]
    assert with_overhead.spent_kwh == pytest.approx(plain.spent_kwh + 500.0)
    assert with_overhead.forecasts[0]["remaining_low_kwh"] == pytest.approx(plain.forecasts[0]["remaining_low_kwh"])


def test_the_guard_prices_the_whole_run_at_the_run_s_own_cap_or_the_calibrated_one() -> None:
    forecaster = fitted_forecaster(cap=15.0)
    calibrated = BudgetGuard(forecaster, budget_kwh=1.0, batch_samples=N, ceiling=0.97)
    own = BudgetGuard(forecaster, budget_kwh=1.0, batch_samples=N, ceiling=0.97, cap_epochs=5.0)
    # Unit rate: an epoch is the 280 training samples, plus a third of each evaluation's 120.
    assert (calibrated.price.pool, calibrated.price.holdout) == (280, 120)
    for guard, cap in ((calibrated, 15.0), (own, 5.0)):
        evaluations = 1 + math.ceil(cap * 18 / 4)  # 18 steps of 16 an epoch, evaluated every 4th step
        assert guard.price.kwh(100.0) == guard.price.kwh(cap) == pytest.approx(cap * 280 + evaluations * EVAL_SAMPLE_WEIGHT * 120)


def test_a_forecast_past_the_run_s_cap_is_charged_in_full_and_the_sentence_names_the_cap() -> None:
    """A run capped at one epoch and forecast to need at least 40 is stopped before its first step
    even under a budget that holds the capped run: it would end at its cap short of the cutoff."""
    pessimistic = Forecast(Interval(50.0, 40.0, 80.0, 0.9), None, None, "index", False, None, {})
    priced = BudgetGuard(fitted_forecaster(cap=15.0), budget_kwh=1.0, batch_samples=N, ceiling=0.97, cap_epochs=1.0).price
    holds_the_cap = 1.5 * priced.kwh(1.0)
    model, x, y = task()
    guard = BudgetGuard(fitted_forecaster(cap=15.0), budget_kwh=holds_the_cap, batch_samples=N, ceiling=0.97, initial=pessimistic, cap_epochs=1.0)
    result = run(guard, model, x, y, max_epochs=1.0)
    assert result.status == STOPPED_BY_BUDGET and result.steps == 0
    assert guard.forecasts[0]["remaining_low_kwh"] > priced.rate.kwh(39.0 * priced.pool, 0)  # all 40 epochs, not the cap's one
    assert "at least 40.00 epochs in all, past the run's cap of 1.00 where it would stop short of the cutoff" in guard.reason

    within = Forecast(Interval(0.8, 0.5, 0.9, 0.9), None, None, "index", False, None, {})
    model, x, y = task()
    plain = BudgetGuard(fitted_forecaster(cap=15.0), budget_kwh=0.1 * priced.kwh(1.0), batch_samples=N, ceiling=0.97, initial=within, cap_epochs=1.0)
    run(plain, model, x, y, max_epochs=1.0)
    assert plain.reason is not None and "past the run's cap" not in plain.reason


def test_a_forecaster_without_an_energy_rate_is_refused_with_what_to_give() -> None:
    from shiftcost.errors import InputError

    forecaster = fitted_forecaster()
    forecaster.energy_rate = None
    with pytest.raises(InputError, match="writes it to forecaster.json: give that file"):
        BudgetGuard(forecaster, budget_kwh=1.0, batch_samples=N, ceiling=0.97)
