"""``benchmarks/forecast_accuracy.py``'s replay of the budget guard, as the library runs it: the
probe only where it pays against the cap and charged when it runs, the index forecast elsewhere."""

from __future__ import annotations

from tests.forecast.helpers import fitted_forecaster
from tests.test_selection_rule import _benchmark

from shiftcost.energy import EVAL_SAMPLE_WEIGHT
from shiftcost.forecast import protocol
from shiftcost.forecast.forecaster import Forecast, Interval

PREDICTORS = ("constant", "isotonic_accuracy_drop", "stage0", "stage0_probe")
BATCH = 100  # 70 trained, 30 held out: an evaluation costs 10 work units


def _forecast(median: float, low: float, high: float, stage: str) -> Forecast:
    return Forecast(Interval(median, low, high, 0.9), None, None, stage, False, None, {})


def _run(index: Forecast, probe_full_work: float, probe_work: float = 8.0) -> dict:
    """A retrain that reaches the cutoff at its tenth step of 16 (160 sample-gradients, 11 evaluations)."""
    pool, holdout = protocol.split_sizes(BATCH)
    target = 0.9
    curve = [(k, k * 16 / pool, k * 16, 0.5 + 0.05 * k, 1.0) for k in range(11)]
    return {
        "cost": 160 + EVAL_SAMPLE_WEIGHT * 11 * holdout, "status": "reached", "eval_every": 1,
        "guard": {
            "curve": curve, "target": target, "n": BATCH, "initial": _forecast(2.0, 1.5, 3.0, "probe"), "index": index,
            "probe_work": probe_work, "probe_full_work": probe_full_work,
        },
    }


def test_the_deployed_guard_starts_from_the_index_forecast_where_a_probe_cannot_pay():
    accuracy = _benchmark("forecast_accuracy")
    forecaster = fitted_forecaster()
    work = accuracy.work_units(BATCH)
    run = _run(_forecast(20.0, 10.0, 30.0, "index"), probe_full_work=5.0)
    cap = run["cost"] + 10  # the run itself fits
    assert work(10.0) > cap  # but even the index forecast's lower bound does not
    as_scored = accuracy._guard_figures([run], forecaster, cap, as_deployed=False, work=work)
    deployed = accuracy._guard_figures([run], forecaster, cap, as_deployed=True, work=work)
    # From the probe stage the run goes through; from the index forecast it is stopped at once, needlessly.
    assert as_scored["stopped"] == 0 and as_scored["recovered_within_cap"] == 1 and as_scored["work_spent"] == run["cost"]
    assert deployed["probed"] == 0 and deployed["stopped"] == 1 and deployed["stopped_but_would_have_recovered_within_cap"] == 1
    # Stopped at its first evaluation (of the holdout alone), before a step.
    assert deployed["recovered_within_cap"] == 0 and deployed["work_spent"] == EVAL_SAMPLE_WEIGHT * protocol.split_sizes(BATCH)[1]


def test_the_deployed_guard_probes_where_the_index_interval_straddles_the_cap_and_charges_the_probe():
    accuracy = _benchmark("forecast_accuracy")
    forecaster = fitted_forecaster()
    work = accuracy.work_units(BATCH)
    run = _run(_forecast(10.0, 0.5, 40.0, "index"), probe_full_work=5.0, probe_work=30.0)
    cap = run["cost"] + 20  # inside the index interval; the probe's 30 units push the run past it
    assert work(0.5) < cap < work(40.0) and 5.0 <= 0.05 * cap
    deployed = accuracy._guard_figures([run], forecaster, cap, as_deployed=True, work=work)
    assert deployed["probed"] == 1 and deployed["runs"] == 1
    assert deployed["over_cap_without_guard"] == 1  # charged: 30 + the run's cost is over the cap
    assert deployed["recovered_within_cap"] == 0 and deployed["work_spent"] <= 30.0 + run["cost"]
    assert accuracy._guard_figures([run], forecaster, cap, as_deployed=False, work=work)["over_cap_without_guard"] == 0
    # A probe priced above 5% of the cap is not run, so nothing is charged for it.
    dear = _run(_forecast(10.0, 0.5, 40.0, "index"), probe_full_work=0.06 * cap, probe_work=30.0)
    assert accuracy._guard_figures([dear], forecaster, cap, as_deployed=True, work=work)["probed"] == 0
    # Unless the share allowed is the user's larger one, as the benchmark replays it too.
    assert accuracy._guard_figures([dear], forecaster, cap, as_deployed=True, work=work, max_share=0.1)["probed"] == 1
    rows = accuracy.budget_table([dear | dict.fromkeys(PREDICTORS, Interval(2.0, 1.0, 3.0, 0.9))], forecaster, work)
    assert {row[accuracy._deployed_row(1.0)]["probed"] for row in rows.values()} == {1}
