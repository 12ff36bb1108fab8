"""The retraining policy: every branch of the decision table, and monotonicity in the budgets."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftcost.errors import ConfigError
from shiftcost.policy import BudgetState, PolicySettings, decide

DAY_START = datetime(2025, 3, 4, tzinfo=timezone.utc)
DAY_END = DAY_START + timedelta(days=1)


def cost(kwh: float = 1.0, co2: float = 0.4, *, spread: float = 0.5, not_converging: bool = False, **extra) -> dict:
    """A prediction with an interval of +-``spread`` (relative) around the point estimate."""
    return {
        "epochs": 3.0,
        "epochs_lower": 2.0,
        "epochs_upper": 5.0,
        "kwh": kwh,
        "kwh_lower": kwh * (1 - spread),
        "kwh_upper": kwh * (1 + spread),
        "co2": co2,
        "co2_lower": co2 * (1 - spread),
        "co2_upper": co2 * (1 + spread),
        "level": 0.9,
        "predicted_not_to_converge": not_converging,
        **extra,
    }


def daily(name: str = "daily", *, kwh_cap=10.0, co2_cap=4.0, kwh_left=None, co2_left=None, scope: str = "*") -> BudgetState:
    return BudgetState(name, scope, "daily", kwh_cap, co2_cap, kwh_left, co2_left, DAY_START, DAY_END)


def per_run(name: str = "per-run", *, kwh_cap=None, co2_cap=None, scope: str = "*") -> BudgetState:
    return BudgetState(name, scope, "per_run", kwh_cap, co2_cap)


def codes(decision) -> list[str]:
    return [reason.code for reason in decision.reasons]


# ----------------------------------------------------------------------------- table


def test_within_every_budget_retrains_and_says_why() -> None:
    decision = decide(cost(), [daily(), per_run(kwh_cap=5.0)], drift_verdict=True)
    assert decision.action == "retrain"
    assert codes(decision) == ["drift_detected", "within_budget", "within_budget"]
    assert [r.budget for r in decision.reasons[1:]] == ["daily", "per-run"]
    assert decision.kwh == pytest.approx(1.5) and decision.co2 == pytest.approx(0.6)  # upper bounds
    assert not decision.blocked_by_budget


@pytest.mark.parametrize("over", ["first", "second"])
@pytest.mark.parametrize("measure", ["kwh", "co2"])
def test_over_any_one_of_two_budgets_is_refused_naming_that_budget(over: str, measure: str) -> None:
    tight = {"kwh_cap": 1.2} if measure == "kwh" else {"co2_cap": 0.5}  # below the upper bounds 1.5 / 0.6
    budgets = [per_run("first", kwh_cap=100.0, co2_cap=100.0), per_run("second", kwh_cap=100.0, co2_cap=100.0)]
    index = 0 if over == "first" else 1
    budgets[index] = per_run(over, **tight)
    decision = decide(cost(), budgets, drift_verdict=True)
    assert decision.action == "skip"
    blocking = decision.blocking_reasons
    assert [r.budget for r in blocking] == [over] and blocking[0].code == "over_budget_cap"
    assert repr(over) in blocking[0].message
    other = "second" if over == "first" else "first"
    assert any(r.budget == other and r.code == "within_budget" for r in decision.reasons)
    assert decision.blocked_by_budget


def test_upper_bound_versus_point_estimate_switches_the_outcome() -> None:
    # Point 1.0 kWh fits a 1.2 kWh per-run cap; the upper bound 1.5 kWh does not.
    budgets = [per_run(kwh_cap=1.2)]
    assert decide(cost(), budgets, PolicySettings(use_upper_bound=True), drift_verdict=True).action == "skip"
    point = decide(cost(), budgets, PolicySettings(use_upper_bound=False), drift_verdict=True)
    assert point.action == "retrain" and point.basis == "point" and point.kwh == pytest.approx(1.0)


def test_periodic_budget_short_now_but_fitting_its_cap_defers_to_the_next_period() -> None:
    decision = decide(cost(), [daily(kwh_left=1.0)], drift_verdict=True)  # needs 1.5 of cap 10
    assert decision.action == "defer"
    assert codes(decision)[-1] == "over_budget_now"
    assert decision.retry_after == DAY_END
    assert decision.to_dict()["retry_after"] == DAY_END.isoformat()


def test_more_than_the_full_cap_skips_even_for_a_periodic_budget() -> None:
    decision = decide(cost(kwh=8.0), [daily(kwh_left=1.0)], drift_verdict=True)  # upper 12 > cap 10
    assert decision.action == "skip"
    assert codes(decision)[-1] == "over_budget_cap"
    assert decision.retry_after is None


def test_skip_beats_defer_when_one_budget_can_never_fit() -> None:
    decision = decide(cost(), [daily(kwh_left=1.0), per_run(co2_cap=0.5)], drift_verdict=True)
    assert decision.action == "skip"
    assert sorted(r.code for r in decision.blocking_reasons) == ["over_budget_cap", "over_budget_now"]


def test_rolling_budget_defers_without_a_retry_time() -> None:
    rolling = BudgetState("week", "*", "rolling", 10.0, None, 0.5, None)
    decision = decide(cost(), [rolling], drift_verdict=True)
    assert decision.action == "defer" and decision.retry_after is None
    assert decision.budget_state[0]["period"] == "rolling_days"


def test_no_drift_skips_without_costing() -> None:
    decision = decide(None, [daily(kwh_left=0.0)], drift_verdict=False)
    assert decision.action == "skip" and codes(decision) == ["no_drift"]
    assert not decision.assessed and decision.kwh is None and not decision.blocked_by_budget


def test_always_assess_costs_a_no_drift_batch_but_still_skips_it() -> None:
    decision = decide(cost(), [daily()], PolicySettings(always_assess=True), drift_verdict=False)
    assert decision.action == "skip" and decision.assessed
    assert codes(decision) == ["no_drift", "always_assess", "within_budget"]
    assert decision.kwh == pytest.approx(1.5)
    with pytest.raises(ValueError):
        decide(None, [daily()], PolicySettings(always_assess=True), drift_verdict=False)


@pytest.mark.parametrize("setting, action", [("skip", "skip"), ("defer", "defer")])
def test_predicted_not_to_converge_is_its_own_outcome(setting: str, action: str) -> None:
    decision = decide(cost(not_converging=True), [daily()], PolicySettings(on_not_converging=setting), drift_verdict=True)
    assert decision.action == action
    assert [r.code for r in decision.blocking_reasons] == ["not_converging"]
    assert not decision.blocked_by_budget


def test_not_converging_and_over_budget_are_both_reported() -> None:
    decision = decide(cost(not_converging=True), [per_run(kwh_cap=1.0)], PolicySettings(on_not_converging="defer"), drift_verdict=True)
    assert decision.action == "skip"
    assert sorted(r.code for r in decision.blocking_reasons) == ["not_converging", "over_budget_cap"]


@pytest.mark.parametrize(
    "drop, action, code",
    [(0.01, "skip", "below_min_benefit"), (0.05, "skip", "below_min_benefit"), (0.2, "retrain", "benefit_met"), (None, "retrain", "benefit_not_checked")],
)
def test_minimum_benefit_rule(drop, action: str, code: str) -> None:
    decision = decide(cost(), [daily()], PolicySettings(min_accuracy_drop=0.05), drift_verdict=True, accuracy_drop=drop)
    assert decision.action == action
    assert codes(decision)[-1] == code
    assert decision.reasons[-1].numbers == {"accuracy_drop": drop, "min_accuracy_drop": 0.05}


def test_without_the_rule_a_tiny_accuracy_drop_still_retrains() -> None:
    assert decide(cost(), [daily()], drift_verdict=True, accuracy_drop=0.0).action == "retrain"


def test_budgets_scoped_to_other_models_do_not_apply() -> None:
    budgets = [per_run("other-model", kwh_cap=0.1, scope="resnet"), per_run("mine", kwh_cap=10.0, scope="digits-cnn"), daily("all")]
    decision = decide(cost(), budgets, drift_verdict=True, model_name="digits-cnn")
    assert decision.action == "retrain"
    assert [r.budget for r in decision.reasons if r.budget] == ["mine", "all"]
    assert [b["applies"] for b in decision.budget_state] == [False, True, True]
    # Without a model name every budget given applies.
    assert decide(cost(), budgets, drift_verdict=True).action == "skip"


def test_no_applicable_budget_allows_retraining() -> None:
    decision = decide(cost(kwh=1e6), [], drift_verdict=True)
    assert decision.action == "retrain" and codes(decision)[-1] == "no_budget"


def test_missing_energy_figure_skips_only_when_energy_is_capped() -> None:
    unknown = cost()
    unknown.update(kwh=None, kwh_lower=None, kwh_upper=None)
    decision = decide(unknown, [per_run(kwh_cap=10.0)], drift_verdict=True)
    assert decision.action == "skip" and decision.blocking_reasons[0].code == "cost_unknown"
    assert decide(unknown, [per_run(co2_cap=10.0)], drift_verdict=True).action == "retrain"


def test_unbounded_interval_never_fits_and_serialises_as_null() -> None:
    decision = decide(cost(kwh_upper=math.inf), [daily()], drift_verdict=True)
    assert decision.action == "skip"
    assert "unbounded" in decision.blocking_reasons[0].message
    data = json.loads(json.dumps(decision.to_dict(), allow_nan=False))
    assert data["kwh"] is None and data["reasons"][-1]["numbers"]["kwh_needed"] is None


def test_reads_the_cost_model_prediction_and_the_ledger_status() -> None:
    from shiftcost.costmodel import CostPrediction
    from shiftcost.store.ledger import BudgetStatus

    prediction = CostPrediction(
        epochs=3.0, epochs_lower=2.0, epochs_upper=5.0,
        energy_kwh=1.0, energy_kwh_lower=0.5, energy_kwh_upper=1.5,
        emissions_kg=0.4, emissions_kg_lower=0.2, emissions_kg_upper=0.6,
        level=0.9, predicted_not_to_converge=False, p_not_converge=0.05, max_epochs=20.0, model_version=1,
    )  # fmt: skip
    status = BudgetStatus(
        name="gpu-day", scope="*", period="daily", rolling_days=None, kwh_cap=2.0, co2_cap=None,
        at=DAY_START + timedelta(hours=3), window_start=DAY_START, window_end=DAY_END,
        settled_kwh=0.3, settled_co2=0.1, reserved_kwh=0.4, reserved_co2=0.0, open_reservations=1,
    )  # fmt: skip
    decision = decide(prediction, [status], drift_verdict=True)
    # 1.5 kWh (90% upper bound) against 2.0 - 0.7 = 1.3 kWh left: wait for tomorrow.
    assert decision.action == "defer" and decision.retry_after == DAY_END
    reason = decision.blocking_reasons[0]
    assert reason.numbers["kwh_remaining"] == pytest.approx(1.3) and "90% upper bound" in reason.message
    assert decide(prediction, [status], PolicySettings(use_upper_bound=False), drift_verdict=True).action == "retrain"


def test_to_dict_is_json_ready_and_complete() -> None:
    decision = decide(cost(), [daily(kwh_left=1.0), per_run(co2_cap=3.0)], PolicySettings(min_accuracy_drop=0.01), drift_verdict=True, accuracy_drop=0.3)
    data = json.loads(json.dumps(decision.to_dict(), allow_nan=False))
    assert data["action"] == "defer" and data["blocked_by_budget"] is True
    assert data["summary"].startswith("defer: ") and "'daily'" in data["summary"]
    assert {r["code"] for r in data["reasons"]} == {"drift_detected", "over_budget_now", "within_budget", "benefit_met"}
    assert data["budget_state"][0]["window_start"] == DAY_START.isoformat()
    assert data["settings"] == {"use_upper_bound": True, "always_assess": False, "min_accuracy_drop": 0.01, "on_not_converging": "skip"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: PolicySettings(on_not_converging="retrain"),
        lambda: PolicySettings(min_accuracy_drop=math.nan),
        lambda: BudgetState("b", period="weekly", kwh_cap=1.0),
        lambda: BudgetState("b", kwh_cap=-1.0),
    ],
)
def test_bad_settings_raise_config_errors(make) -> None:
    with pytest.raises(ConfigError):
        make()


# ----------------------------------------------------------------------------- monotonicity

_caps = st.one_of(st.none(), st.floats(0.0, 20.0))
_budget = st.builds(
    lambda period, kwh_cap, co2_cap, kwh_used, co2_used, scope: BudgetState(
        f"b-{period}-{kwh_cap}-{co2_cap}",
        scope,
        period,
        kwh_cap,
        co2_cap,
        None if kwh_cap is None else kwh_cap - kwh_used,
        None if co2_cap is None else co2_cap - co2_used,
        DAY_START,
        DAY_END,
    ),
    st.sampled_from(["per_run", "daily", "monthly", "rolling_days"]),
    _caps,
    _caps,
    st.floats(0.0, 25.0),
    st.floats(0.0, 25.0),
    st.sampled_from(["*", "digits", "other"]),
)
_prediction = st.builds(
    lambda kwh, co2, spread, not_converging: cost(kwh, co2, spread=spread, not_converging=not_converging),
    st.floats(0.0, 15.0),
    st.floats(0.0, 6.0),
    st.floats(0.0, 0.9),
    st.booleans(),
)
_settings = st.builds(
    PolicySettings,
    use_upper_bound=st.booleans(),
    min_accuracy_drop=st.one_of(st.none(), st.floats(0.0, 0.2)),
    on_not_converging=st.sampled_from(["skip", "defer"]),
)
SEVERITY = {"retrain": 0, "defer": 1, "skip": 2}


@settings(max_examples=300, deadline=None)
@given(
    budgets=st.lists(_budget, min_size=1, max_size=3),
    prediction=_prediction,
    policy=_settings,
    drop=st.one_of(st.none(), st.floats(0.0, 0.5)),
    which=st.integers(0, 2),
    spend=st.floats(0.0, 10.0),
    shrink=st.floats(0.0, 1.0),
    add_cap=st.one_of(st.none(), st.floats(0.0, 20.0)),
)
def test_tightening_a_budget_never_makes_the_decision_more_permissive(budgets, prediction, policy, drop, which, spend, shrink, add_cap) -> None:
    which %= len(budgets)
    old = budgets[which]

    def tighten(cap, left):
        if cap is None:  # an uncapped measure may become capped
            return (add_cap, add_cap) if add_cap is not None else (None, None)
        new_cap = cap * shrink
        return new_cap, min(left - spend, new_cap)

    kwh_cap, kwh_left = tighten(old.kwh_cap, old.remaining_kwh)
    co2_cap, co2_left = tighten(old.co2_cap, old.remaining_co2)
    tighter = list(budgets)
    tighter[which] = BudgetState(old.name, old.scope, old.period, kwh_cap, co2_cap, kwh_left, co2_left, old.window_start, old.window_end)

    before = decide(prediction, budgets, policy, drift_verdict=True, accuracy_drop=drop, model_name="digits")
    after = decide(prediction, tighter, policy, drift_verdict=True, accuracy_drop=drop, model_name="digits")
    assert SEVERITY[after.action] >= SEVERITY[before.action]
    if before.action != "retrain":
        assert after.action != "retrain"


def test_a_batch_predicted_at_zero_epochs_is_never_retrained_whatever_the_budget() -> None:
    # Drift detected, no budget limits it, the upper bound is positive: still nothing to gain.
    at_target = cost(kwh=0.0, epochs=0.0, epochs_lower=0.0, epochs_upper=1.0, kwh_upper=0.5)
    decision = decide(at_target, [], drift_verdict=True)
    assert decision.action == "skip"
    assert "already_at_target" in codes(decision)
    needs_training = cost(epochs=0.5)
    assert decide(needs_training, [], drift_verdict=True).action == "retrain"


def test_an_unlabelled_batch_waits_for_labels_only_when_they_could_change_its_fate() -> None:
    from types import SimpleNamespace

    from shiftcost.config import Settings
    from shiftcost.pipeline.decide import decide_batch, status_after

    loaded = SimpleNamespace(
        reference=SimpleNamespace(accuracy=0.95), model_name="digits", data=SimpleNamespace(has_labels=False), new_task=False,
        unknown_labels=[], batch_id=7, source_uri="file:///landing/night.npz",
    )
    report = SimpleNamespace(accuracy=None, task_change=False)
    drift = SimpleNamespace(verdict=True)

    def decided(prediction: dict):
        estimate = SimpleNamespace(prediction=prediction, problem=None)
        return decide_batch(Settings(), loaded, report, drift, estimate, [])

    # Its label-free forecast would retrain it: it waits for the labels the retrain needs.
    waits = decided(cost(epochs=2.0))
    assert waits.action == "defer" and status_after(waits) == "awaiting_labels"
    assert "night.labels.npz" in next(r.message for r in waits.reasons if r.code == "awaiting_labels")
    # Its label-free forecast says there is nothing to gain: finished, with no promise of waiting.
    done = decided(cost(kwh=0.0, epochs=0.0, epochs_lower=0.0, epochs_upper=0.0))
    assert done.action == "skip" and status_after(done) == "done"
    assert "already_at_target" in codes(done) and "awaiting_labels" not in codes(done)
