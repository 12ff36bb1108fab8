"""Stage 0 / stage 1 forecasts, in-flight conditioning, energy, and the not-to-converge flag."""

from __future__ import annotations

import copy
import json
import math
import re
import statistics

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shiftcost.calibrate import analyse, best_index
from shiftcost.energy import EVAL_SAMPLE_WEIGHT, HostEnergyRate
from shiftcost.errors import InputError
from shiftcost.forecast import protocol
from shiftcost.forecast.curve import epochs_to_target, fit_curve
from shiftcost.forecast.forecaster import STAGE1_DEFAULT, Forecaster, naive_did_better, out_of_fold_log_epochs
from shiftcost.forecast.probe import PROBE_STRATUM
from tests.forecast.helpers import INDEX, UNIT_RATE, fitted_forecaster, forecast_rows

#: The probe feature stage 1 reads by default (held at slope 1).
READ = STAGE1_DEFAULT[0]


def test_stage1_uses_out_of_fold_index_predictions_and_the_probe() -> None:
    forecaster = fitted_forecaster()
    stage0 = forecaster.stage0
    version = stage0.history_.latest
    # Independent check of the out-of-fold prior: refit stage 0 without each kind, predict it.
    from shiftcost.costmodel import CostModel

    rows = forecast_rows()
    oof = out_of_fold_log_epochs(stage0)
    for kind in ("kind0", "kind3"):
        train = [r for r in rows if r["corruption"] != kind]
        model = CostModel(features=list(INDEX), max_epochs=15.0).fit(train, groups="corruption")
        for i, row in enumerate(rows):
            if row["corruption"] == kind:
                assert oof[i] == pytest.approx(model.explain(row)["log_epochs"], abs=1e-5)
    assert version.rows[0]["group"] == "kind0"
    # The probe's feature carries the truth here: a fit of its weight leans on it.
    free = dict(zip(forecaster.stage1.features_, forecaster.stage1.free_coef_))
    assert free[READ] > 0.3
    assert forecaster.stage1.loo_["mdape_epochs"] < forecaster.stage0.loo_["mdape_epochs"]


def test_stage1_keeps_the_rows_that_needed_no_training_as_left_censored() -> None:
    rows = forecast_rows()
    for row in rows[::8]:  # each kind's mildest level needed no training
        row["epochs"] = 0.0
    forecaster = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0)
    stage1 = forecaster.stage1
    assert len(stage1.history_.latest.rows) == len(rows)
    assert stage1.loo_["n_zero_cost"] == len(rows[::8])


def test_leave_one_kind_out_scores_both_stages_as_forecast_makes_them_on_batches_that_needed_training() -> None:
    rows = forecast_rows()
    for row in rows[::8]:  # each kind's mildest level needed no training, and its probe started at the target
        row.update(epochs=0.0, probe_already_met=True)
    rows[1]["probe_already_met"] = True  # a probe whose first evaluation met the target by the split's luck
    forecaster = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0)
    result = forecaster.leave_one_kind_out(rows)
    # Independently: each kind forecast by a forecaster fitted on the others, one batch at a time.
    probe_ape, index_ape, probe_hits, naive_ape, naive_hits, naive_log = [], [], [], [], [], []
    for kind in dict.fromkeys(r["corruption"] for r in rows):
        fold = Forecaster.fit([r for r in rows if r["corruption"] != kind], features=list(INDEX), max_epochs=15.0)
        others = sorted(r["epochs"] for r in rows if r["corruption"] != kind and r["epochs"] > 0)
        for row in (r for r in rows if r["corruption"] == kind and r["epochs"] > 0):
            naive_ape.append(abs(statistics.median(others) - row["epochs"]) / row["epochs"])
            naive_log.append(abs(math.log(1 + statistics.median(others)) - math.log(1 + row["epochs"])))
            naive_hits.append(np.quantile(others, 0.05) <= row["epochs"] <= np.quantile(others, 0.95))
            probed = fold.predict_from_probe_features(row, row, already_met=row.get("probe_already_met", False)).epochs
            index = fold.predict(row).epochs
            probe_ape.append(abs(probed.median - row["epochs"]) / row["epochs"])
            index_ape.append(abs(index.median - row["epochs"]) / row["epochs"])
            probe_hits.append(probed.low <= row["epochs"] <= probed.high)
    assert result["needing_none"] == result["needing_none_forecast_at_zero"] == 5
    assert result["probe"]["n"] == result["index"]["n"] == len(rows) - 5 and result["probe"]["n_censored"] == 0
    assert result["probe"]["mdape_epochs"] == pytest.approx(np.median(probe_ape))
    assert result["probe"]["coverage_epochs"] == pytest.approx(np.mean(probe_hits))
    assert result["index"]["mdape_epochs"] == pytest.approx(np.median(index_ape))
    # Beside them, the naive forecast both must beat: the other kinds' median epochs.
    assert result["constant"]["n"] == result["index"]["n"]
    assert result["constant"]["mdape_epochs"] == pytest.approx(np.median(naive_ape))
    assert result["constant"]["coverage_epochs"] == pytest.approx(np.mean(naive_hits))
    assert result["constant"]["mean_abs_log_error"] == pytest.approx(np.mean(naive_log))
    # The batch whose probe started at the target is forecast at zero although it needed training.
    assert max(probe_ape) == pytest.approx(1.0)
    # The probe's curve carries the truth here, the indices less so.
    assert result["probe"]["mdape_epochs"] < result["index"]["mdape_epochs"]
    assert result["probe"]["mdape_epochs"] < result["constant"]["mdape_epochs"] and naive_did_better(result) is None


def test_calibration_says_when_neither_stage_beats_the_other_kinds_median_epochs() -> None:
    from rich.console import Console

    from shiftcost.calibrate.outputs import markdown_report
    from shiftcost.cli.calibrate import _print_probe_stage

    rows = [
        r | {"status": "reached", "intensity": 0.5, "runs": [], "accuracy_drop": 0.97 - r["accuracy"], "energy_kwh": None}
        for r in forecast_rows()
    ]
    result = analyse(rows, settings={"batch_size": 16}, features=list(INDEX))
    # Here the probe's curve carries the truth: a stage beats the naive forecast and nothing is said.
    assert naive_did_better(result.loco_stages) is None and "no better a guess" not in markdown_report(result)

    def scored(naive: tuple, index: tuple, probe: tuple) -> dict:
        stages = result.loco_stages
        return stages | {
            name: stages[name] | {"mdape_epochs": mdape, "mean_abs_log_error": log_error}
            for name, (mdape, log_error) in (("constant", naive), ("index", index), ("probe", probe))
        }

    assert naive_did_better(scored((0.40, 0.5), (0.39, 0.9), (0.60, 0.9))) is None  # one stage better is enough
    # Better on the log error, where the batches that ran to the cap count, is enough too: MdAPE over
    # reached batches alone favours a forecast at the middle.
    assert naive_did_better(scored((0.40, 0.5), (0.60, 0.9), (0.60, 0.2))) is None
    assert naive_did_better(scored((0.40, 0.5), (0.60, 0.9), (None, 0.9))) is None  # a stage with nothing to score is not beaten
    verdict = naive_did_better(scored((0.41, 0.5), (0.68, 0.9), (0.41, 0.5)))  # a tie is no better
    assert verdict is not None
    assert "(MdAPE of epochs 41% and mean |log error| 0.50, against 68% and 0.90 for the index stage and 41% and 0.50" in verdict
    result.loco_stages = scored((0.41, 0.5), (0.68, 0.9), (0.41, 0.5))
    report = markdown_report(result)
    assert verdict[1:] in report and f"| median of the other kinds (naive) | {result.loco_stages['constant']['n']} |" in report
    console = Console(record=True, width=1000)
    _print_probe_stage(result.forecaster, result.loco_stages, console)
    printed = console.export_text()
    assert verdict in printed and "the other kinds' median epochs (naive): 41%, 0.50," in printed
    naive = result.loco_stages["constant"]
    assert f"(of {naive['n']}, {naive['n_censored']} capped)" in printed and "no probe stage could be fitted" not in printed
    # A kind no fold could leave out is named: the stages' figures then cover different batches.
    console = Console(record=True, width=1000)
    _print_probe_stage(result.forecaster, result.loco_stages | {"kinds_not_fitted": ["frost"]}, console)
    assert "no probe stage could be fitted with frost left out, so its figures leave that kind out." in console.export_text()


def test_leave_one_kind_out_counts_a_capped_batch_only_as_a_definite_miss() -> None:
    rows = forecast_rows(cap=4.0)
    capped = [r for r in rows if not r["reached_cutoff"]]
    result = Forecaster.fit(rows, features=list(INDEX), max_epochs=4.0).leave_one_kind_out(rows)
    assert capped and result["probe"]["n_censored"] == len(capped) and result["probe"]["n"] == len(rows)
    # In the log error a capped batch is a bound: a forecast beyond what it spent is no error.
    log_errors, beyond = [], 0
    for kind in dict.fromkeys(r["corruption"] for r in rows):
        fold = Forecaster.fit([r for r in rows if r["corruption"] != kind], features=list(INDEX), max_epochs=4.0)
        for row in (r for r in rows if r["corruption"] == kind):
            short = math.log1p(row["epochs"]) - math.log1p(fold.predict_from_probe_features(row, row).epochs.median)
            log_errors.append(abs(short) if row["reached_cutoff"] else max(short, 0.0))
            beyond += not row["reached_cutoff"] and short < 0
    assert beyond > 0 and result["probe"]["mean_abs_log_error"] == pytest.approx(np.mean(log_errors))
    for row in capped:
        row["epochs"] = 1e6  # spent far beyond any forecast: every interval ends below it
    result = Forecaster.fit(rows, features=list(INDEX), max_epochs=4.0).leave_one_kind_out(rows)
    assert result["probe"]["censored_definite_misses"] == result["index"]["censored_definite_misses"] == len(capped)


def test_a_calibration_whose_stages_cannot_be_compared_keeps_its_forecaster_and_says_why(monkeypatch) -> None:
    from shiftcost.calibrate.outputs import markdown_report

    def fails(self, rows, *, group_key="corruption"):
        raise FloatingPointError("overflow in a fold")

    monkeypatch.setattr(Forecaster, "leave_one_kind_out", fails)
    sweep_rows = [
        r | {"status": "reached", "intensity": 0.5, "runs": [], "accuracy_drop": 0.97 - r["accuracy"], "energy_kwh": None}
        for r in forecast_rows()
    ]
    result = analyse(sweep_rows, settings={"batch_size": 16}, features=list(INDEX))
    assert result.forecaster.stage1 is not None and result.forecaster.left_out is None
    assert "overflow in a fold" in result.loco_stages["error"]
    assert "Not compared: " in markdown_report(result)
    assert "No probe with this cost model" not in markdown_report(result)
    # A probe stage that reads nothing of the probe is reported as such, compared or not.
    against = [r | {READ: -r[READ]} for r in sweep_rows]
    held = analyse(against, settings={"batch_size": 16}, features=list(INDEX))
    assert "Not compared: " in markdown_report(held)
    assert f"No probe with this cost model: the probe stage's weight on {READ} is 0" in markdown_report(held)
    from rich.console import Console

    from shiftcost.cli.calibrate import _print_probe_stage

    console = Console(record=True, width=1000)
    _print_probe_stage(held.forecaster, held.loco_stages, console)
    printed = console.export_text()
    assert "overflow in a fold" in printed and f"weight on {READ} is 0 when fitted, held at its sign bound" in printed
    # The same with the curve's weight fitted rather than held at 1.
    fitted = Forecaster.fit(against, features=list(INDEX), stage1_offsets=())
    assert fitted.stage1.free_coef_ is None and fitted.stage1.coef_.tolist() == [0.0]
    assert f"weight on {READ} is 0, held at its sign bound" in fitted.probe_not_worth()


def test_a_probe_is_worth_running_only_where_calibration_forecast_better_with_it(tmp_path) -> None:
    rows = forecast_rows()
    helpful = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0)
    helpful.left_out = helpful.leave_one_kind_out(rows)
    assert helpful.probe_not_worth() is None
    # A probe curve that says nothing about the epochs: the indices alone forecast better.
    curves = np.random.default_rng(1).permutation([r[READ] for r in rows])
    scrambled = [r | {READ: float(c)} for r, c in zip(rows, curves)]
    useless = Forecaster.fit(scrambled, features=list(INDEX), max_epochs=15.0)
    useless.left_out = useless.leave_one_kind_out(scrambled)
    probe, index = useless.left_out["probe"]["mdape_epochs"], useless.left_out["index"]["mdape_epochs"]
    assert probe >= index
    reason = useless.probe_not_worth()
    assert reason is not None and f"MdAPE of epochs {probe:.0%}) than with the indices alone ({index:.0%})" in reason
    # The verdict travels with the file and with the probe stage the pipeline stores.
    assert Forecaster.load(useless.save(tmp_path / "forecaster.json")).probe_not_worth() == reason
    assert Forecaster.with_probe_stage(useless.stage0, useless.probe_stage()).probe_not_worth() == reason
    # A cost model saved before calibration measured this probes as before.
    useless.left_out = None
    assert useless.probe_not_worth() is None


@pytest.mark.parametrize("offsets", [(), None], ids=["weight fitted", "held at 1"])
def test_a_probe_stage_whose_weight_is_held_at_its_sign_bound_is_not_worth_a_probe(tmp_path, offsets) -> None:
    rows = forecast_rows()
    # A probe feature that falls as the epochs rise: its sign bound (more of it, more cost) holds its fitted weight at 0.
    against = [r | {READ: -r[READ]} for r in rows]
    held = Forecaster.fit(against, features=list(INDEX), max_epochs=15.0, stage1_offsets=offsets)
    fitted = held.stage1.coef_ if offsets == () else held.stage1.free_coef_
    assert dict(zip(held.stage1.features_, fitted)) == {READ: 0.0}
    first, last = (held.predict_from_probe_features(rows[0], {READ: c}).epochs for c in (-0.5, -3.0))
    # Fitted, what the probe sees changes nothing; held at 1, it is read against what calibration says.
    assert (first == last) == (offsets == ())
    reason = held.probe_not_worth()
    assert reason is not None and f"weight on {READ} is 0" in reason and "held at its sign bound" in reason
    assert Forecaster.load(held.save(tmp_path / "forecaster.json")).probe_not_worth() == reason
    # Whatever calibration's own comparison said, and with a weight above 0 the comparison decides again.
    held.left_out = {"probe": {"mdape_epochs": 0.1}, "index": {"mdape_epochs": 0.9}}
    assert held.probe_not_worth() == reason
    reading = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0, stage1_offsets=offsets)
    reading.left_out = held.left_out
    assert reading.probe_not_worth() is None


def slow_truncated_quantiles(mu: float, sd: float, bound: float, probs: list[float], n: int = 400_000) -> list[float]:
    draws = np.random.default_rng(0).normal(mu, sd, n)
    kept = draws[draws > bound]
    return [float(np.quantile(kept, p)) for p in probs]


def test_in_flight_forecast_is_conditioned_on_the_epochs_spent() -> None:
    forecaster = fitted_forecaster()
    epochs = [0.0, 0.5, 1.0, 1.5]
    accuracy = [0.3, 0.35, 0.38, 0.4]
    loss = [2.0, 1.9, 1.85, 1.8]
    prior = forecaster.predict(forecast_rows()[5])
    half = 1.6448536269514722
    mu = math.log1p(prior.epochs.median)
    sd = (math.log1p(prior.epochs.high) - math.log1p(prior.epochs.low)) / (2 * half)
    own = fit_curve(epochs, accuracy, 0.93)
    own_epochs = min(epochs_to_target(own, 0.9), 3 * 15.0)
    for weight_evals, weight in ((math.inf, 0.0), (3.0, 0.5)):
        forecast = forecaster.in_flight(
            epochs, accuracy, loss, target=0.9, ceiling=0.93, prior=prior, own_curve_evals=weight_evals
        )
        assert forecast.stage == "in_flight"
        assert forecast.epochs.low >= 1.5 and forecast.epochs.low <= forecast.epochs.median <= forecast.epochs.high
        assert forecast.features["own_curve_weight"] == pytest.approx(weight)
        # Against Monte Carlo rejection sampling of the same normal law of log(epochs + 1),
        # its centre moved ``weight`` of the way to the run's own curve's crossing.
        centre = (1 - weight) * mu + weight * math.log1p(own_epochs)
        lo, med, hi = slow_truncated_quantiles(centre, sd, math.log1p(1.5), [0.05, 0.5, 0.95])
        assert forecast.epochs.median == pytest.approx(max(math.expm1(med), 1.5), rel=0.02)
        assert forecast.epochs.low == pytest.approx(max(math.expm1(lo), 1.5), rel=0.02)
        assert forecast.epochs.high == pytest.approx(math.expm1(hi), rel=0.03)
    # By default both count: the run's own curve moves the forecast made before it.
    default = forecaster.in_flight(epochs, accuracy, loss, target=0.9, ceiling=0.93, prior=prior)
    assert 0.0 < default.features["own_curve_weight"] < 1.0
    assert default.epochs.median != pytest.approx(
        forecaster.in_flight(epochs, accuracy, loss, target=0.9, ceiling=0.93, prior=prior, own_curve_evals=math.inf).epochs.median
    )
    # Without a prior forecast the index model's forecast is the prior.
    plain = forecaster.in_flight(epochs, accuracy, loss, target=0.9, ceiling=0.93, features=forecast_rows()[5], own_curve_evals=math.inf)
    assert plain.epochs.median == pytest.approx(
        forecaster.in_flight(epochs, accuracy, loss, target=0.9, ceiling=0.93, prior=prior, own_curve_evals=math.inf).epochs.median
    )


def test_not_converging_uses_the_sweep_cap_even_when_no_run_was_capped() -> None:
    rows = forecast_rows()
    assert not any(not r["reached_cutoff"] for r in rows)
    settings = {"max_epochs": 3.0, "batch_size": 16}
    sweep_rows = [
        r | {"status": "reached", "intensity": 0.5, "runs": [], "accuracy_drop": 0.97 - r["accuracy"], "energy_kwh": None}
        for r in rows
    ]
    result = analyse(sweep_rows, settings=settings, features=list(INDEX))
    assert result.cost_model.max_epochs == 3.0 and result.forecaster.max_epochs == 3.0
    hardest = max(rows, key=lambda r: r["epochs"])
    prediction = result.cost_model.predict_costs([hardest])[0]
    assert prediction.epochs > 3.0 and prediction.predicted_not_to_converge
    assert result.forecaster.predict(hardest).not_converging


def test_energy_counts_evaluations_so_zero_epochs_is_not_free() -> None:
    forecaster = fitted_forecaster()
    from shiftcost.forecast.forecaster import Interval

    energy = Interval(0.0, 0.0, 2.0, 0.9).map(forecaster.retrain_price(100).kwh)
    pool, holdout = protocol.split_sizes(100)
    assert (pool, holdout) == (70, 30)
    assert energy.median == pytest.approx(EVAL_SAMPLE_WEIGHT * holdout) and energy.median > 0
    per_epoch = protocol.steps_per_epoch(pool, 16)
    evals = 1 + math.ceil(2 * per_epoch / max(1, per_epoch // 4))
    assert energy.high == pytest.approx(2 * pool + EVAL_SAMPLE_WEIGHT * evals * holdout)


def test_a_forecast_prices_the_replayed_reference_and_stops_at_the_cap() -> None:
    """kWh as the retrain spends them: its epochs train the replayed reference samples too (half the
    pool at replay 0.5, as many as the reference holds), and no run goes past the cap."""
    forecaster = fitted_forecaster()
    plain = forecaster.retrain_price(100)
    replayed = forecaster.retrain_price(100, replay_fraction=0.5, reference_samples=1000)
    short = forecaster.retrain_price(100, replay_fraction=0.5, reference_samples=20)
    assert (plain.pool, replayed.pool, short.pool) == (70, 140, 90) and plain.holdout == replayed.holdout == 30
    per_epoch = protocol.steps_per_epoch(140, 16)
    evals = 1 + math.ceil(2 * per_epoch / max(1, per_epoch // 4))
    assert replayed.kwh(2.0) == pytest.approx(2 * 140 + EVAL_SAMPLE_WEIGHT * evals * 30)
    cap = forecaster.max_epochs
    assert replayed.kwh(3 * cap) == replayed.kwh(cap) > replayed.kwh(cap - 1)
    longer = forecaster.retrain_price(100, cap_epochs=2 * cap)
    assert longer.kwh(3 * cap) == longer.kwh(2 * cap) > plain.kwh(2 * cap)
    row = forecast_rows()[20]
    forecast = forecaster.predict(row, price=replayed, carbon_intensity=0.5)
    assert forecast.energy_kwh == forecast.epochs.map(replayed.kwh)
    assert forecast.co2_kg.median == pytest.approx(0.5 * forecast.energy_kwh.median)
    assert forecaster.predict(row).energy_kwh is None
    assert Forecaster(forecaster.stage0, max_epochs=cap).retrain_price(100) is None


def test_host_energy_rate_is_the_median_ratio_where_no_line_is_identified() -> None:
    runs = [(1e-5, 1000, 300), (2e-5, 1000, 300), (9e-4, 1000, 300), (1.5e-5, 500, 0)]
    ratios = sorted(kwh * 3.6e6 / (t + e / 3) for kwh, t, e in runs)
    spread = np.median(np.abs(np.array(ratios) - np.median(ratios))) / np.median(ratios)
    # Asked for; two runs; and runs on a line with a negative intercept (2 mJ a sample less 1 J).
    negative = [((2e-3 * w - 1.0) / 3.6e6, w, 0) for w in (1000, 2000, 4000)]
    for rate, expected in (
        (HostEnergyRate.fit(runs, method="median_ratio"), ratios),
        (HostEnergyRate.fit(runs[:2]), ratios[:2]),
        (HostEnergyRate.fit(negative), [2e-3 - 1.0 / w for w in (1000, 2000, 4000)]),
    ):
        assert rate.overhead_joules == 0.0
        assert rate.joules_per_sample == pytest.approx(np.median(expected))
    assert HostEnergyRate.fit(runs, method="median_ratio").spread == pytest.approx(spread)
    fitted = HostEnergyRate.fit(runs)
    assert fitted.refit([(None, 10, 0)]) is fitted


def _repeated_medians(x: list[float], y: list[float]) -> tuple[float, float]:
    """Siegel's estimator written out: the median over points of the median slope to every other point."""
    import statistics

    slopes = [statistics.median((y[j] - y[i]) / (x[j] - x[i]) for j in range(len(x)) if x[j] != x[i]) for i in range(len(x))]
    slope = statistics.median(slopes)
    return slope, statistics.median(yi - slope * xi for xi, yi in zip(x, y))


def test_host_energy_rate_separates_a_run_overhead_from_the_rate_and_ignores_outliers() -> None:
    # 0.6 J a run plus 1.5 mJ a sample-gradient; two of nine runs measured on a loaded machine.
    works = [(0, 150), (300, 150), (600, 300), (1500, 300), (3000, 600), (6000, 900), (9000, 900), (12000, 1200), (15000, 1500)]
    joules = [0.6 + 1.5e-3 * (t + e / 3) for t, e in works]
    joules[2] *= 4.0
    joules[7] *= 3.0
    rate = HostEnergyRate.fit([(j / 3.6e6, t, e) for j, (t, e) in zip(joules, works)], threads=2)
    assert rate.overhead_joules == pytest.approx(0.6) and rate.joules_per_sample == pytest.approx(1.5e-3)
    # A retrain that trained on nothing costs its overhead and its evaluation, not a share of a typical run.
    assert rate.kwh(0, 150) * 3.6e6 == pytest.approx(0.6 + 1.5e-3 * 50)
    assert rate.marginal_kwh(0, 150) * 3.6e6 == pytest.approx(1.5e-3 * 50)
    assert HostEnergyRate.from_dict(rate.to_dict()) == rate


def test_a_rate_is_not_carried_to_another_kind_of_device() -> None:
    rate = HostEnergyRate(1e-3, 0.1, 9, hardware="1 x NVIDIA H200", threads=1, device="cuda")
    assert HostEnergyRate.from_dict(rate.to_dict()) == rate
    assert rate.device_mismatch("cuda") is None and rate.device_mismatch("cuda:1") is None
    assert rate.device_mismatch("cpu") == (
        "the energy rate was measured on cuda (1 x NVIDIA H200) and this retrain runs on cpu; the kWh it is priced and guarded by do not hold there"
    )
    # The device is named before the thread count, which only a CPU run is priced by.
    assert rate.mismatch("cpu", 2) == ("device", rate.device_mismatch("cpu"))
    assert rate.mismatch("cuda:0", 2) is None
    on_cpu = HostEnergyRate(1e-3, 0.1, 9, threads=1, device="cpu")
    assert on_cpu.mismatch("cpu", 2) == ("threads", on_cpu.thread_mismatch(2)) and on_cpu.mismatch("cpu", 1) is None
    # Rates from before the device was recorded, and the refit of one, stay silent and keep it.
    assert HostEnergyRate(1e-3, 0.1, 9).device_mismatch("cpu") is None
    refitted = rate.refit([(1e-6, 1000, 300), (2e-6, 2000, 300), (4e-6, 4000, 300)])
    assert refitted.device == "cuda" and refitted.joules_per_sample != rate.joules_per_sample


@given(
    st.lists(st.tuples(st.integers(0, 20000), st.integers(1, 3000), st.floats(0.5, 2.0)), min_size=3, max_size=12),
    st.floats(0.0, 5.0),
    st.floats(1e-4, 1e-2),
)
def test_host_energy_rate_is_siegels_line_when_its_intercept_and_slope_are_positive(runs, overhead, per_sample) -> None:
    works = [t + EVAL_SAMPLE_WEIGHT * e for t, e, _ in runs]
    assume(max(works) > min(works))
    joules = [(overhead + per_sample * w) * noise for w, (_, _, noise) in zip(works, runs)]
    rate = HostEnergyRate.fit([(j / 3.6e6, t, e) for j, (t, e, _) in zip(joules, runs)])
    slope, intercept = _repeated_medians(works, joules)
    # At a zero intercept or slope, rounding alone decides between the line and the fallback.
    assume(abs(intercept) > 1e-9 * max(joules) and abs(slope) > 1e-9 * max(joules) / max(works))
    if slope > 0 and intercept > 0:
        assert (rate.joules_per_sample, rate.overhead_joules) == (pytest.approx(slope), pytest.approx(intercept))
    else:
        assert rate.overhead_joules == 0.0 and rate.joules_per_sample == pytest.approx(float(np.median(np.array(joules) / works)))


def test_round_trip_and_plain_cost_model_files(tmp_path) -> None:
    forecaster = fitted_forecaster()
    path = forecaster.save(tmp_path / "forecaster.json")
    again = Forecaster.load(path)
    row = forecast_rows()[7]
    assert again.predict(row).to_dict() == forecaster.predict(row).to_dict()
    # calibrate writes costmodel.json beside forecaster.json: named alone, it brings the
    # forecaster's probe stage and energy rate with it, and is the index stage itself.
    other = Forecaster.fit(forecast_rows(seed=3), features=list(INDEX), max_epochs=15.0).stage0
    (tmp_path / "costmodel.json").write_text(other.to_json())
    paired = Forecaster.load(tmp_path / "costmodel.json")
    assert paired.energy_rate == forecaster.energy_rate and paired.stage1 is not None
    assert json.loads(paired.stage0.to_json()) == json.loads(other.to_json())
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "costmodel.json").write_text(forecaster.stage0.to_json())
    plain = Forecaster.load(tmp_path / "alone" / "costmodel.json")
    assert plain.stage1 is None and plain.energy_rate is None and plain.max_epochs == 15.0
    (tmp_path / "alone" / "forecaster.json").write_text("{")
    with pytest.raises(InputError, match="Forecaster file .*forecaster.json: .*not readable JSON"):
        Forecaster.load(tmp_path / "alone" / "costmodel.json")
    with pytest.raises(InputError, match="does not exist"):
        Forecaster.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not readable JSON"):
        Forecaster.load(tmp_path / "bad.json")
    # Another file calibrate writes, named by mistake: one sentence naming the files that would do.
    (tmp_path / "points.json").write_text(json.dumps([{"epochs": 1.0}]))
    with pytest.raises(InputError, match=r"points.json is neither a forecaster nor a cost model file; give the forecaster.json or costmodel.json"):
        Forecaster.load(tmp_path / "points.json")
    # The directory `calibrate --out` wrote: its forecaster.json, else its costmodel.json.
    assert Forecaster.load(tmp_path).stage1 is not None
    (tmp_path / "forecaster.json").unlink()
    assert Forecaster.load(tmp_path).stage1 is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds neither forecaster.json nor costmodel.json"):
        Forecaster.load(tmp_path / "empty")
    assert json.loads(forecaster.to_json())["energy_rate"]["joules_per_sample"] == UNIT_RATE.joules_per_sample


def test_chance_accuracy_is_refused_with_one_sentence() -> None:
    with pytest.raises(InputError, match="no better than chance") as caught:
        protocol.check_above_chance(0.097, 10, 0.03, "the reference data")
    assert str(caught.value).count(". ") == 0
    protocol.check_above_chance(0.9, 10, 0.03, "the reference data")


def test_best_index_within_kinds_names_its_tie_break() -> None:
    def cell(value):
        return {"energy_kwh": {"spearman": value}}

    features = ["resque_dist", "inv_ari", "layer_shift", "accuracy_drop"]
    correlations = {
        "features": features,
        "overall": {"resque_dist": cell(0.5), "inv_ari": cell(0.8), "layer_shift": cell(0.6), "accuracy_drop": cell(0.9)},
        "per_type": {
            "a": {f: cell(1.0) for f in features},
            "b": {f: cell(1.0) for f in features},
        },
    }
    best = best_index(correlations)
    assert set(best["within_type_tie"]) == {"resque_dist", "inv_ari", "layer_shift"}
    assert best["best_index_within_type"] == "inv_ari"  # the highest overall among the tied
    assert "tie" in best["within_type_rule"]


def test_a_probe_that_starts_at_the_target_forecasts_no_training() -> None:
    from shiftcost.forecast.probe import ProbeCost, ProbeTrajectory

    forecaster = fitted_forecaster()
    cost = ProbeCost(steps=2, sample_gradients=32, samples_evaluated=90, seconds=0.1, energy_kwh=None, energy_measured=False)

    def probe(first: float) -> ProbeTrajectory:
        return ProbeTrajectory(
            epochs=[0.0, 0.1, 0.2], accuracy=[first, 0.5, 0.5], loss=[1.0, 1.2, 1.3], initial_grad_norm=1.0, grad_noise_scale=None,
            loss_drop_per_step=-0.1, target_accuracy=0.9, ceiling=0.93, pool_samples=70, holdout_samples=30, cost=cost,
        )

    row = forecast_rows()[20]
    met = forecaster.predict(row, probe=probe(0.91), price=forecaster.retrain_price(100))
    assert (met.epochs.median, met.epochs.low, met.epochs.high) == (0.0, 0.0, 0.0) and not met.not_converging
    assert met.energy_kwh.median > 0  # its one evaluation still costs
    unmet = forecaster.predict(row, probe=probe(0.89), price=forecaster.retrain_price(100))
    assert unmet.epochs.median > 0 and unmet.epochs.median <= 3 * forecaster.max_epochs


def test_a_probe_below_the_target_never_forecasts_zero_epochs() -> None:
    """Not at the target at the first evaluation, the run needs more than zero epochs, even when
    the curve crosses at once (a forecast of 0 epochs would admit it under any budget)."""
    # Calibration as on real data: batches already at the target cost nothing and their curve crosses at 0.
    met_rows = [
        forecast_rows()[0] | {"corruption": f"kind{k}", READ: 0.0, "epochs": 0.0, "accuracy": 0.95} for k in range(5) for _ in range(3)
    ]
    forecaster = Forecaster.fit(forecast_rows() + met_rows, features=list(INDEX), max_epochs=15.0, energy_rate=UNIT_RATE, batch_size=16)
    crossing_at_once = {READ: 0.0, "probe_progress": 1.0, "probe_loss_drop": 0.5}
    fitted = forecaster.stage1.predict_costs([crossing_at_once])[0]
    assert fitted.epochs == fitted.epochs_lower == 0.0  # what the regression alone says
    below = forecaster.predict_from_probe_features(met_rows[0], crossing_at_once)
    assert below.epochs.low > 0 and below.epochs.median > below.epochs.low and below.epochs.high > below.epochs.median
    met = forecaster.predict_from_probe_features(met_rows[0], crossing_at_once, already_met=True)
    assert (met.epochs.low, met.epochs.median, met.epochs.high) == (0.0, 0.0, 0.0)


def test_a_probe_beyond_the_calibrated_range_is_held_at_its_edge_and_flagged() -> None:
    forecaster = fitted_forecaster()
    row = forecast_rows()[20]
    edge = float(forecaster.stage1.history_.latest.state["feature_max"][0])

    def probe(curve: float):
        return forecaster.predict_from_probe_features(row, {READ: curve, "probe_progress": 0.5, "probe_loss_drop": 0.2})

    assert probe(edge - 0.1).extrapolated == []
    beyond = probe(edge + 5.0)  # a curve that never crosses
    assert beyond.extrapolated == [READ] and beyond.to_dict()["extrapolated"] == [READ]
    assert beyond.epochs == probe(edge).epochs


def test_a_probe_pays_only_when_the_index_interval_straddles_the_budget() -> None:
    import inspect

    from shiftcost.cli.retrain import retrain
    from shiftcost.config import Settings
    from shiftcost.forecast.decide import MAX_PROBE_SHARE, probe_pays
    from shiftcost.forecast.forecaster import Interval

    interval = Interval(2.0, 1.0, 5.0, 0.9)
    assert probe_pays(interval, budget_left_kwh=3.0, probe_energy_kwh=0.01).probe
    assert not probe_pays(interval, budget_left_kwh=6.0, probe_energy_kwh=0.01).probe  # fits anyway
    assert not probe_pays(interval, budget_left_kwh=0.5, probe_energy_kwh=0.01).probe  # deferred anyway
    assert not probe_pays(interval, budget_left_kwh=3.0, probe_energy_kwh=1.0).probe  # would eat the budget
    # The share is the caller's: a third of the budget may be allowed, a share of 0 never probes.
    dear = probe_pays(interval, budget_left_kwh=3.0, probe_energy_kwh=1.0, max_share=0.25)
    assert not dear.probe and "more than 25% of the budget left" in dear.reason
    allowed = probe_pays(interval, budget_left_kwh=3.0, probe_energy_kwh=1.0, max_share=0.34)
    assert allowed.probe and "at most 34% of it" in allowed.reason
    assert not probe_pays(interval, budget_left_kwh=3.0, probe_energy_kwh=1e-9, max_share=0.0).probe
    # Every entry point starts from the library's share: the pipeline's setting and `retrain --probe-max-share`.
    assert Settings().probe_max_share == MAX_PROBE_SHARE
    assert inspect.signature(retrain).parameters["probe_max_share"].default == MAX_PROBE_SHARE


def test_stage1_needs_only_the_probe_features_its_design_reads() -> None:
    # Rows from a calibration stored before a probe feature existed still fit a design that
    # does not read it; a design that does is refused with a reason, and so is a probe
    # forecast whose features lack what the fitted stage 1 reads.
    older = [{k: v for k, v in row.items() if k != "probe_gap"} for row in forecast_rows()]
    curve_only = Forecaster.fit(older, features=list(INDEX), stage1_features=("curve_log_epochs",))
    assert curve_only.stage1 is not None and curve_only.stage1_error is None
    with_gap = Forecaster.fit(older, features=list(INDEX), stage1_features=("curve_log_epochs", "probe_gap"))
    assert with_gap.stage1 is None and "probe_gap" in with_gap.stage1_error
    fitted = Forecaster.fit(forecast_rows(), features=list(INDEX), stage1_features=("curve_log_epochs", "probe_gap"))
    with pytest.raises(InputError, match="probe_gap"):
        fitted.predict_from_probe_features(older[0], {"curve_log_epochs": older[0]["curve_log_epochs"]})


def test_a_forecast_is_refused_for_retrains_unlike_the_calibrated_ones(tmp_path) -> None:
    from shiftcost.errors import ConfigError
    from shiftcost.recipe import RetrainConfig
    from tests.test_calibrate import _synthetic_rows

    calibrated = {
        "batch_size": 32, "lr": 3e-3, "optimizer": "sgd", "weight_decay": 0.01, "freeze_batchnorm": False, "tolerance": 0.02,
        "holdout_fraction": 0.3, "schedule": "cosine", "augment": ["RandomHorizontalFlip"], "replay_fraction": 0.25,
        "momentum": 0.8,
    }
    same = RetrainConfig().replace(**calibrated)
    # What a sweep records is what its forecaster keeps, through a file too; the recipe's own
    # settings come from the recipe the sweep recorded whole.
    recorded = {name: calibrated[name] for name in ("batch_size", "lr", "optimizer", "tolerance", "holdout_fraction", "replay_fraction")}
    result = analyse(_synthetic_rows(), settings=recorded | {"probe_steps": 0, "retrain": same.to_dict()}, features=["resque_dist"])
    # SGD's momentum is kept; the cosine schedule has no period or factor to keep.
    assert result.forecaster.retrain_settings == calibrated | {"train_step": "none"}
    loaded = Forecaster.load(result.forecaster.save(tmp_path / "forecaster.json"))
    loaded.check_retrain(same, "this retrain")
    changes = (
        ("batch_size", 64), ("lr", 1e-3), ("optimizer", "adam"), ("weight_decay", 0.0), ("freeze_batchnorm", True),
        ("tolerance", 0.05), ("holdout_fraction", 0.2), ("schedule", "constant"), ("augment", []), ("replay_fraction", 0.5),
        ("momentum", 0.5),
    )
    for name, other in changes:
        with pytest.raises(ConfigError, match=rf"{name} {re.escape(str(calibrated[name]))} \(here {re.escape(str(other))}\), not what this retrain uses"):
            loaded.check_retrain(same.replace(**{name: other}), "this retrain")
    with pytest.raises(ConfigError, match=r"train_step none \(here tests.forecast.test_forecaster:step\)"):
        loaded.check_retrain(same.replace(train_step="tests.forecast.test_forecaster:step"), "this retrain")

    # A recipe that leaves the replay share to its default replays only where reference data is given.
    default_settings = {"probe_steps": 0, "replay_fraction": RetrainConfig().recipe.replay_with(True), "retrain": RetrainConfig().to_dict()}
    by_default = analyse(_synthetic_rows(), settings=default_settings, features=["resque_dist"])
    by_default.forecaster.check_retrain(RetrainConfig(), "this retrain", reference_available=True)
    with pytest.raises(ConfigError, match=r"replay_fraction 0.5 \(here 0.0\)"):
        by_default.forecaster.check_retrain(RetrainConfig(), "this retrain", reference_available=False)


def test_momentum_the_step_schedule_and_the_caps_are_checked_only_where_they_move_the_training() -> None:
    from shiftcost.errors import ConfigError
    from shiftcost.recipe import RetrainConfig
    from tests.test_calibrate import _synthetic_rows

    def calibrated_on(config: RetrainConfig) -> Forecaster:
        # The caps at the top level, where a sweep records them.
        settings = {"probe_steps": 0, "retrain": config.to_dict(), "max_epochs": config.caps.max_epochs, "max_steps": config.caps.max_steps}
        return analyse(_synthetic_rows(), settings=settings, features=["resque_dist"]).forecaster

    stepped = RetrainConfig().replace(optimizer="sgd", schedule="step", momentum=0.5, step_epochs=2.0, gamma=0.5)
    forecaster = calibrated_on(stepped)
    forecaster.check_retrain(stepped, "this retrain")
    for name, other in (("momentum", 0.9), ("step_epochs", 5.0), ("gamma", 0.1)):
        with pytest.raises(ConfigError, match=rf"{name} \S+ \(here {other}\)"):
            forecaster.check_retrain(stepped.replace(**{name: other}), "this retrain")
    # Cosine anneals over the step cap, so another cap is another schedule.
    annealed = RetrainConfig().replace(schedule="cosine", max_epochs=15, max_steps=400)
    for name, other in (("max_epochs", 20), ("max_steps", 300)):
        with pytest.raises(ConfigError, match=rf"{name} \S+ \(here {other}\)"):
            calibrated_on(annealed).check_retrain(annealed.replace(**{name: other}), "this retrain")
    # Adam ignores momentum and a constant schedule has no steps to take or to anneal over:
    # changing them (or the caps, which then only end a run) changes no run.
    plain = RetrainConfig().replace(optimizer="adam", schedule="constant", max_epochs=15)
    assert not {"momentum", "step_epochs", "gamma", "max_epochs", "max_steps"} & set(calibrated_on(plain).retrain_settings)
    calibrated_on(plain).check_retrain(plain.replace(momentum=0.5, step_epochs=1.0, gamma=0.9, max_epochs=20), "this retrain")


def test_later_probes_repeat_the_calibrated_probe_and_a_probe_at_another_rate_is_refused(tmp_path) -> None:
    import dataclasses

    from shiftcost.errors import ConfigError
    from shiftcost.forecast.probe import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLES, ProbeCost, ProbeTrajectory
    from tests.test_calibrate import _synthetic_rows

    calibrated = {"batch_size": 32, "lr": 3e-3, "optimizer": "sgd", "tolerance": 0.02, "holdout_fraction": 0.3}
    result = analyse(_synthetic_rows(), settings=calibrated | {"probe_steps": 12}, features=["resque_dist"])
    loaded = Forecaster.load(result.forecaster.save(tmp_path / "forecaster.json"))
    # Settings from a sweep that does not say its probes stopped at the cutoff (or scaled their rate):
    # they ran every step, at the retrains' rate.
    expected = {
        "steps": 12, "samples": DEFAULT_SAMPLES, "batch_size": DEFAULT_BATCH_SIZE, "lr": 3e-3, "optimizer": "sgd", "stop_at_cutoff": False,
        "rate_scaling": "none",
    }
    assert loaded.probe_options() == expected
    # A file that recorded only the probe's steps probed at its retrains' rate and optimizer.
    older = json.loads((tmp_path / "forecaster.json").read_text())
    older["probe_settings"] = {"steps": 12}
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert Forecaster.load(tmp_path / "older.json").probe_options() == expected
    stopping = analyse(_synthetic_rows(), settings=calibrated | {"probe_steps": 12, "probe_stops_at_cutoff": True}, features=["resque_dist"])
    assert Forecaster.load(stopping.forecaster.save(tmp_path / "stopping.json")).probe_options() == expected | {"stop_at_cutoff": True}
    # Probes that read at most 512 held-out images are repeated so; older ones read the whole holdout.
    capped = analyse(_synthetic_rows(), settings=calibrated | {"probe_steps": 12, "probe_max_holdout": 512}, features=["resque_dist"])
    assert Forecaster.load(capped.forecaster.save(tmp_path / "capped.json")).probe_options() == expected | {"max_holdout": 512}
    # Probes whose rate and clock followed their batch are repeated so; older ones stepped at the retrains' rate.
    scaled = analyse(_synthetic_rows(), settings=calibrated | {"probe_steps": 12, "probe_rate_scaling": "sqrt"}, features=["resque_dist"])
    assert Forecaster.load(scaled.forecaster.save(tmp_path / "scaled.json")).probe_options() == expected | {"rate_scaling": "sqrt"}

    forecaster = fitted_forecaster()
    forecaster.retrain_settings["lr"] = 1e-4
    cost = ProbeCost(steps=2, sample_gradients=32, samples_evaluated=90, seconds=0.1, energy_kwh=None, energy_measured=False)
    probe = ProbeTrajectory(
        epochs=[0.0, 0.1, 0.2], accuracy=[0.6, 0.7, 0.75], loss=[1.0, 0.8, 0.7], initial_grad_norm=1.0, grad_noise_scale=None,
        loss_drop_per_step=0.15, target_accuracy=0.9, ceiling=0.93, pool_samples=70, holdout_samples=30, cost=cost,
        settings={"lr": 1e-4, "optimizer": "adam"},
    )
    row = forecast_rows()[20]
    assert forecaster.predict(row, probe=probe).probe["settings"]["lr"] == 1e-4
    with pytest.raises(ConfigError, match=r"lr 0.0001 \(here 0.001\)"):
        forecaster.predict(row, probe=dataclasses.replace(probe, settings={"lr": 1e-3, "optimizer": "adam"}))
    # A probe on another clock learns another curve: refused too.
    forecaster.probe_settings["rate_scaling"] = "sqrt"
    with pytest.raises(ConfigError, match="rate_scaling"):
        forecaster.predict(row, probe=dataclasses.replace(probe, settings={"lr": 1e-4, "optimizer": "adam", "rate_scaling": "none"}))


def test_a_calibration_records_the_probes_recipe_and_refuses_a_probe_on_another(tmp_path) -> None:
    import dataclasses

    from shiftcost.errors import ConfigError
    from shiftcost.forecast.probe import ProbeCost, ProbeTrajectory
    from shiftcost.recipe import RetrainConfig
    from tests.test_calibrate import _synthetic_rows

    recipe = {"lr": 3e-3, "optimizer": "sgd", "weight_decay": 0.01, "momentum": 0.5}
    config = RetrainConfig().replace(**recipe)
    settings = {"lr": 3e-3, "optimizer": "sgd", "probe_steps": 12, "retrain": config.to_dict()}
    loaded = Forecaster.load(analyse(_synthetic_rows(), settings=settings, features=["resque_dist"]).forecaster.save(tmp_path / "f.json"))
    assert {name: loaded.probe_options()[name] for name in recipe} == recipe

    cost = ProbeCost(steps=2, sample_gradients=32, samples_evaluated=90, seconds=0.1, energy_kwh=None, energy_measured=False)
    probe = ProbeTrajectory(
        epochs=[0.0, 0.1, 0.2], accuracy=[0.6, 0.7, 0.75], loss=[1.0, 0.8, 0.7], initial_grad_norm=1.0, grad_noise_scale=None,
        loss_drop_per_step=0.15, target_accuracy=0.9, ceiling=0.93, pool_samples=70, holdout_samples=30, cost=cost, settings=recipe,
    )
    forecaster = fitted_forecaster()
    forecaster.probe_settings = loaded.probe_settings
    forecaster.predict(forecast_rows()[20], probe=probe)
    with pytest.raises(ConfigError, match=r"weight_decay 0.01 \(here 0.0\)"):
        forecaster.predict(forecast_rows()[20], probe=dataclasses.replace(probe, settings=recipe | {"weight_decay": 0.0}))


def test_forecasts_stop_at_a_horizon_of_a_few_caps() -> None:
    from shiftcost.forecast.forecaster import HORIZON_CAPS, Interval

    forecaster = fitted_forecaster()
    horizon = HORIZON_CAPS * forecaster.max_epochs
    held = forecaster.within_horizon(Interval(40 * horizon, 2 * horizon, 80 * horizon, 0.9))
    assert (held.median, held.low, held.high, held.level) == (horizon, horizon, horizon, 0.9)
    inside = Interval(1.0, 0.5, horizon / 2, 0.9)
    assert forecaster.within_horizon(inside) == inside
    assert forecaster.within_horizon(Interval(1.0, 0.5, math.inf, 0.9)).high == math.inf  # too few runs for a bound


def test_the_probe_feature_held_at_slope_one_stays_there_in_every_left_out_fold_and_once_saved(tmp_path) -> None:
    rows = forecast_rows()
    for row in rows:  # a probe feature at 0.6 of the truth's log scale: a free slope stretches it
        row[READ] *= 0.6
    held = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0)  # held at 1 by default
    free = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0, stage1_offsets=())
    assert held.stage1.offset_features == [READ] and held.stage1.coef_.tolist() == [1.0] and free.stage1.coef_[0] > 1.3
    # The weight a fit would have given it is kept beside: the free fit's.
    assert held.stage1.free_coef_ == pytest.approx(free.stage1.coef_)
    result = held.leave_one_kind_out(rows)
    ape = []
    for kind in dict.fromkeys(r["corruption"] for r in rows):
        fold = Forecaster.fit([r for r in rows if r["corruption"] != kind], features=list(INDEX), max_epochs=15.0, stage1_offsets=(READ,))
        for row in (r for r in rows if r["corruption"] == kind):
            ape.append(abs(fold.predict_from_probe_features(row, row).epochs.median - row["epochs"]) / row["epochs"])
    assert result["probe"]["mdape_epochs"] == pytest.approx(np.median(ape))
    assert result["probe"]["mdape_epochs"] != pytest.approx(free.leave_one_kind_out(rows)["probe"]["mdape_epochs"], rel=0.05)
    loaded = Forecaster.load(held.save(tmp_path / "forecaster.json"))
    assert loaded.stage1.offset_features == [READ]
    assert [loaded.predict_from_probe_features(r, r).to_dict() for r in rows[::7]] == [held.predict_from_probe_features(r, r).to_dict() for r in rows[::7]]


def _needing_training_median(rows: list[dict]) -> float:
    return statistics.median(r["epochs"] for r in rows if not (r["reached_cutoff"] and r["epochs"] == 0))


@pytest.mark.parametrize("pull", [0.25, 0.5, 1.0])
def test_the_probe_stage_is_pulled_towards_the_median_epochs_of_calibrations_batches_that_needed_training(pull, tmp_path) -> None:
    rows = forecast_rows()
    for row in rows[::8]:  # each kind's mildest level needed no training: not part of the median
        row["epochs"] = 0.0
    forecaster = Forecaster.fit(rows, features=list(INDEX), max_epochs=15.0)
    row = forecast_rows()[21]  # narrow interval far above zero epochs: conditioning on needing some training moves nothing
    alone = forecaster.predict_from_probe_features(row, row).epochs
    forecaster.pull_to_median = pull
    pulled = forecaster.predict_from_probe_features(row, row).epochs
    wanted = (1 - pull) * math.log1p(alone.median) + pull * math.log1p(_needing_training_median(rows))
    assert math.log1p(pulled.median) == pytest.approx(wanted, abs=1e-6)
    assert math.log1p(pulled.high) - math.log1p(pulled.low) == pytest.approx(math.log1p(alone.high) - math.log1p(alone.low), abs=1e-6)
    saved = tmp_path / "forecaster.json"
    forecaster.save(saved)
    assert Forecaster.load(saved).predict_from_probe_features(row, row).epochs == pulled
    assert Forecaster.with_probe_stage(forecaster.stage0, forecaster.probe_stage()).predict_from_probe_features(row, row).epochs == pulled


@given(pull=st.floats(0.0, 0.95), curves=st.lists(st.floats(0.0, 2.5), min_size=2, max_size=2, unique=True))
def test_a_pull_towards_the_median_keeps_the_order_of_the_forecasts(pull, curves) -> None:
    forecaster = fitted_forecaster()
    forecaster.pull_to_median = pull
    row = forecast_rows()[20]
    low, high = sorted(curves)
    forecasts = [forecaster.predict_from_probe_features(row, {READ: c, "probe_progress": 0.5, "probe_loss_drop": 0.2}).epochs.median for c in (low, high)]
    assert forecasts[0] <= forecasts[1] + 1e-9


def _stratified_rows(seed: int, kinds: int = 6, per_kind: int = 12) -> list[dict]:
    """Rows whose probe read the cost closely where it met the cutoff (every other run) and
    loosely where its cutoff was extrapolated, as the two strata do on real probes."""
    rng = np.random.default_rng(seed)
    rows = forecast_rows(seed=seed, kinds=kinds, per_kind=per_kind)
    for i, row in enumerate(rows):
        met = i % 2 == 0
        row[PROBE_STRATUM] = float(met)
        row[READ] = math.log1p(row["epochs"]) + float(rng.normal(0.0, 0.05 if met else 0.8))
    return rows


def _log_width(interval) -> float:
    return math.log1p(interval.high) - math.log1p(interval.low)


def test_an_interval_sized_on_the_stratum_keeps_the_median_and_covers_each_stratum_near_its_level(tmp_path) -> None:
    forecaster = Forecaster.fit(_stratified_rows(0), features=list(INDEX), max_epochs=50.0)
    fresh = _stratified_rows(1)
    split = copy.copy(forecaster)
    split.interval_sized_on = "stratum"
    hits: dict[tuple[bool, float], list[bool]] = {}
    for row in fresh:
        pooled = forecaster.predict_from_probe_features(row, row).epochs
        own = split.predict_from_probe_features(row, row).epochs
        assert own.median == pooled.median and own.low <= own.median <= own.high
        assert (_log_width(own) < _log_width(pooled)) == (row[PROBE_STRATUM] == 1.0)
        for design, interval in ((False, pooled), (True, own)):
            hits.setdefault((design, row[PROBE_STRATUM]), []).append(interval.low <= row["epochs"] <= interval.high)
    coverage = {key: float(np.mean(v)) for key, v in hits.items()}
    # One interval for both strata over-covers the close one and under-covers the loose one ...
    assert coverage[(False, 1.0)] == 1.0 and coverage[(False, 0.0)] < 0.85
    # ... sized on each stratum's own runs, both lie near the level.
    assert 0.8 <= coverage[(True, 1.0)] <= 0.97 and 0.8 <= coverage[(True, 0.0)] <= 0.97
    saved = forecaster.save(tmp_path / "pooled.json")
    assert Forecaster.load(saved).interval_sized_on == "every run"
    again = Forecaster.load(split.save(tmp_path / "split.json"))
    assert again.interval_sized_on == "stratum"
    assert again.predict_from_probe_features(fresh[0], fresh[0]).epochs == split.predict_from_probe_features(fresh[0], fresh[0]).epochs
    assert Forecaster.with_probe_stage(split.stage0, split.probe_stage()).interval_sized_on == "stratum"


def test_an_interval_sized_on_the_stratum_falls_back_to_every_run_where_a_stratum_is_too_small_or_unrecorded() -> None:
    rows = _stratified_rows(0)
    for row in rows[1:]:
        row[PROBE_STRATUM] = 0.0
    few = [row | {PROBE_STRATUM: 1.0} for row in rows[::16]]  # fewer met runs than a finite 90% interval needs
    for row in rows[::16]:
        row[PROBE_STRATUM] = 1.0
    assert len(few) < 9
    unrecorded = [{k: v for k, v in row.items() if k != PROBE_STRATUM} for row in rows]
    query = rows[3] | {PROBE_STRATUM: 1.0}
    for calibration in (rows, unrecorded):
        forecaster = Forecaster.fit(calibration, features=list(INDEX), max_epochs=50.0)
        pooled = forecaster.predict_from_probe_features(query, query).epochs
        forecaster.interval_sized_on = "stratum"
        assert forecaster.predict_from_probe_features(query, query).epochs == pooled


def _half_needing_no_training(seed: int) -> list[dict]:
    """Rows whose probe read the cost loosely, beside as many batches that needed no training (their
    probe's first evaluation met the target, so stage 1 never forecasts them): a model that shrugs
    off most of calibration's shifts, as a user's resnet18 did."""
    rng = np.random.default_rng(seed)
    rows = forecast_rows(seed=seed, kinds=6, per_kind=12)
    for row in rows:
        row[READ] = math.log1p(row["epochs"]) + float(rng.normal(0.0, 0.5))
        row["probe_already_met"] = False
    untouched = [row | {"epochs": 0.0, "reached_cutoff": True, "probe_already_met": True, READ: 0.0} for row in rows]
    return rows + untouched


def test_an_interval_sized_on_the_runs_that_needed_training_covers_them_nearer_its_level(tmp_path) -> None:
    forecaster = Forecaster.fit(_half_needing_no_training(0), features=list(INDEX), max_epochs=50.0)
    trained = copy.copy(forecaster)
    trained.interval_sized_on = "needing training"
    fresh = [row for seed in (1, 2, 3) for row in _half_needing_no_training(seed) if not row["probe_already_met"]]
    hits: dict[str, list[bool]] = {"every run": [], "needing training": []}
    for row in fresh:
        pooled = forecaster.predict_from_probe_features(row, row).epochs
        own = trained.predict_from_probe_features(row, row).epochs
        assert own.median == pooled.median and _log_width(own) > _log_width(pooled)
        for design, interval in (("every run", pooled), ("needing training", own)):
            hits[design].append(interval.low <= row["epochs"] <= interval.high)
    coverage = {design: float(np.mean(v)) for design, v in hits.items()}
    # The runs that needed none score 0 and are inside any interval: counted, they narrow it well below
    # its level on the batches it is used on; left out, it covers those nearer the level (conditioning on
    # needing some training lifts the low end above the shortest retrains, so not quite at it).
    assert coverage["every run"] < 0.8
    assert coverage["needing training"] > coverage["every run"] + 0.05
    again = Forecaster.load(trained.save(tmp_path / "trained.json"))
    assert again.interval_sized_on == "needing training"
    assert again.predict_from_probe_features(fresh[0], fresh[0]).epochs == trained.predict_from_probe_features(fresh[0], fresh[0]).epochs


def test_files_from_before_the_interval_design_was_named_load_with_the_design_they_used(tmp_path) -> None:
    forecaster = Forecaster.fit(_stratified_rows(0), features=list(INDEX), max_epochs=50.0)
    for saved_as, design in (({"interval_by_stratum": True}, "stratum"), ({"interval_by_stratum": False}, "every run"), ({}, "every run")):
        payload = json.loads(forecaster.to_json())
        del payload["interval_sized_on"]
        path = tmp_path / "old.json"
        path.write_text(json.dumps(payload | saved_as))
        assert Forecaster.load(path).interval_sized_on == design
    with pytest.raises(InputError, match="not 'by kind'"):
        Forecaster(forecaster.stage0, forecaster.stage1, interval_sized_on="by kind")
    path.write_text(json.dumps(json.loads(forecaster.to_json()) | {"interval_sized_on": "by kind"}))
    with pytest.raises(InputError, match=re.escape(f"forecaster file {path} sizes the probe stage's interval on 'by kind'")):
        Forecaster.load(path)


def test_stage1_can_read_the_stratum_with_either_sign_beside_the_cutoff_at_slope_one() -> None:
    # Where the probe met the cutoff its crossing lies above the retrain's by a factor of two, where it
    # was extrapolated it lies on it: a term for the stratum moves the first down and leaves the rest.
    def rows(seed: int) -> list[dict]:
        out = []
        for row in _stratified_rows(seed):
            met = row[PROBE_STRATUM] == 1.0
            out.append(row | {READ: math.log1p(row["epochs"]) + (math.log(2.0) if met else 0.0)})
        return out

    with_stratum = Forecaster.fit(rows(0), features=list(INDEX), max_epochs=50.0, stage1_features=(READ, PROBE_STRATUM), stage1_offsets=(READ,))
    cutoff_alone = Forecaster.fit(rows(0), features=list(INDEX), max_epochs=50.0, stage1_features=(READ,), stage1_offsets=(READ,))
    errors: dict[tuple[str, bool], list[float]] = {}
    for row in rows(1):
        for name, forecaster in (("stratum", with_stratum), ("alone", cutoff_alone)):
            median = forecaster.predict_from_probe_features(row, row).epochs.median
            errors.setdefault((name, row[PROBE_STRATUM] == 1.0), []).append(math.log1p(median) - math.log1p(row["epochs"]))
    bias = {key: float(np.median(v)) for key, v in errors.items()}
    assert abs(bias[("stratum", True)]) < 0.15 and abs(bias[("stratum", False)]) < 0.15
    # One intercept for both strata splits the difference: the met runs high, the others low.
    assert bias[("alone", True)] > 0.2 and bias[("alone", False)] < -0.2


PROBE_FIELDS = ("curve_log_epochs", "probe_progress", "probe_loss_drop", "probe_gap", "cutoff_log_epochs")


@pytest.mark.parametrize("order", [("none", "sqrt"), ("sqrt", "none")], ids=["first scaling informative", "second informative"])
def test_calibration_keeps_the_probe_whose_rate_forecast_its_kinds_better(order, tmp_path) -> None:
    """Each point ran two probes: one whose curve follows the epochs, one whose curves are
    another point's. Whichever scaling's name it has and whichever came first, the informative one
    is kept, read by the forecaster, and written into every row."""
    informative, scrambled = order
    rows = [
        r | {"status": "reached", "intensity": 0.5, "runs": [], "accuracy_drop": 0.97 - r["accuracy"], "energy_kwh": None}
        for r in forecast_rows()
    ]
    shuffled = np.random.default_rng(3).permutation(len(rows))
    for row, other in zip(rows, shuffled):
        probes = {informative: {name: row[name] for name in PROBE_FIELDS}, scrambled: {name: rows[other][name] for name in PROBE_FIELDS}}
        row["probes"] = {name: probes[name] for name in ("none", "sqrt")}
        row |= row["probes"]["none"]
    result = analyse(copy.deepcopy(rows), settings={"batch_size": 16, "probe_rate_scalings": ["none", "sqrt"]}, features=list(INDEX))
    choice = result.settings["probe_rate_scaling_choice"]
    scores = choice["mdape_epochs_probe"]
    assert choice["chosen"] == informative and scores[informative] < scores[scrambled]
    assert result.settings["probe_rate_scaling"] == informative == result.loco_stages["rate_scaling"]["chosen"]
    assert Forecaster.load(result.forecaster.save(tmp_path / "forecaster.json")).probe_options()["rate_scaling"] == informative
    assert all(row[name] == row["probes"][informative][name] for row in result.rows for name in PROBE_FIELDS)
    # The kept probe's score is the forecaster's own, each kind left out.
    assert result.loco_stages["probe"]["mdape_epochs"] == scores[informative]
    from rich.console import Console

    from shiftcost.calibrate.outputs import markdown_report
    from shiftcost.cli.calibrate import _print_probe_stage

    console = Console(record=True, width=1000)
    _print_probe_stage(result.forecaster, result.loco_stages, console)
    said = f"probe's rate scaling: {informative}, of the probes every point ran"
    assert said in console.export_text() and said in markdown_report(result)
    assert f"{informative} {scores[informative]:.0%}" in markdown_report(result)


def test_a_tie_between_probes_keeps_the_first_scaling() -> None:
    rows = [
        r | {"status": "reached", "intensity": 0.5, "runs": [], "accuracy_drop": 0.97 - r["accuracy"], "energy_kwh": None}
        for r in forecast_rows()
    ]
    for row in rows:
        row["probes"] = {name: {field: row[field] for field in PROBE_FIELDS} for name in ("sqrt", "none")}
    for first in ("sqrt", "none"):
        settings = {"batch_size": 16, "probe_rate_scalings": [first, ({"sqrt", "none"} - {first}).pop()]}
        choice = analyse(rows, settings=settings, features=list(INDEX)).settings["probe_rate_scaling_choice"]
        assert choice["chosen"] == first and choice["mdape_epochs_probe"]["sqrt"] == choice["mdape_epochs_probe"]["none"]
    # A second analysis on other features (as the label-free model's) does not choose again.
    assert "probe_rate_scaling_choice" not in analyse(rows, settings={"batch_size": 16}, features=list(INDEX)).settings
