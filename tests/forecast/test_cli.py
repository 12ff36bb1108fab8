"""``shiftcost forecast`` and ``shiftcost retrain --cost-model --budget-kwh``: the JSON names scripts rely on."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiftcost.data.batches import Batch, save_batch
from shiftcost.data.models import save_model
from shiftcost.forecast.forecaster import STAGE1_DEFAULT, Forecaster
from shiftcost.forecast.price import RetrainPrice
from shiftcost.index.engine import compute_reference_stats
from tests.forecast.helpers import INDEX, UNIT_RATE, bars, fitted_forecaster, long_retrain_rows, trained_bars

INTERVAL = {"median", "low", "high", "level"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("forecast")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, spec, x, y = trained_bars()
        save_model(model, spec, out / "model.safetensors")
        compute_reference_stats(model, spec, x, y, device="cpu").save(out / "reference.safetensors")
        save_batch(Batch((1 - x).contiguous(), y, "inverted"), out / "batch.npz")
        save_batch(Batch(x, y, "reference"), out / "reference.npz")
        fitted_forecaster().save(out / "forecaster.json")
    finally:
        torch.set_num_threads(threads)
    return out


def shiftcost(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from shiftcost.cli import main; main()", *args],
        capture_output=True, text=True, env=env, timeout=300, cwd=cwd,
    )


def forecast_args(files, *extra: str) -> list[str]:
    return [
        "forecast", "--model", str(files / "model.safetensors"), "--reference-stats", str(files / "reference.safetensors"),
        "--batch", str(files / "batch.npz"), "--cost-model", str(files / "forecaster.json"), "--device", "cpu",
        "--carbon-intensity", "0.4", *extra,
    ]


def test_forecast_json_names(files) -> None:
    done = shiftcost(*forecast_args(files, "--probe-steps", "5", "--json"), cwd=files)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for name in ("epochs", "energy_kwh", "co2_kg"):
        assert set(data[name]) == INTERVAL, name
        assert data[name]["low"] <= data[name]["median"]
    assert data["co2_kg"]["median"] == pytest.approx(0.4 * data["energy_kwh"]["median"])
    assert data["stage"] == "probe"
    assert data["probe"]["steps"] == 5 and data["probe"]["seconds"] > 0 and data["probe"]["energy"] > 0
    assert data["probe"]["energy_measured"] is True  # CodeCarbon, as retrains are
    assert data["probe"]["estimated_energy_kwh"] > 0
    assert {"resque_dist", "accuracy", "curve_log_epochs"} <= set(data["features"])
    assert isinstance(data["not_converging"], bool)
    assert isinstance(data["extrapolated"], list)


def test_the_forecast_table_says_what_the_probe_trained_and_evaluated(files) -> None:
    done = shiftcost(*forecast_args(files, "--probe-steps", "3", "--no-energy"), cwd=files)
    assert done.returncode == 0, done.stderr
    said = re.search(r"probe: (\d+) steps, (\d+) sample-gradients, (\d+) held-out samples evaluated", " ".join(done.stdout.split()))
    assert said, done.stdout
    steps, trained, evaluated = map(int, said.groups())
    # Each step trains one batch of 16; the holdout (30% of the batch) is read before the first step and after each.
    assert 1 <= steps <= 3 and trained == 16 * steps and evaluated == (steps + 1) * round(0.3 * len(bars()[1]))


def test_forecast_without_energy_tracking_charges_the_estimate(files) -> None:
    done = shiftcost(*forecast_args(files, "--probe-steps", "3", "--no-energy", "--json"), cwd=files)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)["probe"]
    assert probe["energy_measured"] is False and probe["energy"] == probe["estimated_energy_kwh"] > 0


def test_forecast_without_probe_is_the_index_stage(files) -> None:
    done = shiftcost(*forecast_args(files, "--no-probe", "--json"), cwd=files)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["stage"] == "index" and data["probe"]["steps"] == 0
    assert "curve_log_epochs" not in data["features"]
    # Priced as the retrain spends: 84 training images of the 120 plus as many replayed from the
    # reference (the default recipe replays half of each epoch), the holdout of 36 evaluated, at
    # most the retrains' 15-epoch cap (calibration's).
    price = RetrainPrice(pool=84 + 84, holdout=36, batch_size=16, rate=UNIT_RATE, cap_epochs=15.0)
    assert data["energy_kwh"] == pytest.approx({key: price.kwh(value) if key != "level" else value for key, value in data["epochs"].items()})


def test_no_probe_runs_unasked_where_calibration_forecast_no_better_with_one(files) -> None:
    forecaster = fitted_forecaster()
    forecaster.left_out = {"probe": {"mdape_epochs": 0.85}, "index": {"mdape_epochs": 0.66}}
    cost_model = forecaster.save(files / "forecaster-probe-no-better.json")
    args = forecast_args(files, "--json", "--no-energy")
    args[args.index("--cost-model") + 1] = str(cost_model)
    done = shiftcost(*args, cwd=files)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stage"] == "index" and json.loads(done.stdout)["probe"]["steps"] == 0
    assert "no probe: calibration forecast its batches that needed training" in " ".join(done.stderr.split())
    asked = shiftcost(*args, "--probe-steps", "3", cwd=files)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["stage"] == "probe" and json.loads(asked.stdout)["probe"]["steps"] == 3
    guarded = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(files / "g.safetensors"),
        "--reference-stats", str(files / "reference.safetensors"), "--cost-model", str(cost_model), "--budget-kwh", "60",
        "--batch-size", "16", "--no-energy", "--device", "cpu", "--json", cwd=files,
    )
    assert guarded.returncode in (0, 3, 4), guarded.stderr
    assert "the guard starts from the index forecast" in " ".join(guarded.stderr.split())


@pytest.mark.parametrize(
    "architecture, input_shape, calibrated_on",
    [("resnet18", None, "resnet18"), ("digits_cnn", "1x32x32", "digits_cnn at 1x32x32")],
)
def test_a_cost_model_of_another_architecture_or_input_size_is_refused_before_any_work(
    files, tmp_path, architecture: str, input_shape: str | None, calibrated_on: str
) -> None:
    other = fitted_forecaster()
    other.architecture, other.input_shape = architecture, input_shape
    cost_model = other.save(tmp_path / "forecaster.json")
    forecast = shiftcost(
        "forecast", "--model", str(files / "model.safetensors"), "--reference-stats", str(files / "reference.safetensors"),
        "--batch", str(files / "batch.npz"), "--cost-model", str(cost_model), "--device", "cpu", cwd=tmp_path,
    )
    out = tmp_path / "retrained.safetensors"
    guarded = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(out),
        "--cost-model", str(cost_model), "--budget-kwh", "60", "--batch-size", "16", "--no-energy", "--device", "cpu", cwd=tmp_path,
    )
    for done, model in ((forecast, files / "model.safetensors"), (guarded, "this model file")):
        sentence = " ".join(done.stderr.split())
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"The cost model was calibrated on {calibrated_on}, not on digits_cnn at 1x8x8 like {model}; run `shiftcost calibrate`" in sentence
    assert not out.exists()


def test_contradictory_probe_options_are_one_sentence(files) -> None:
    done = shiftcost(*forecast_args(files, "--no-probe", "--probe-steps", "3"), cwd=files)
    assert done.returncode == 2 and "contradict" in done.stderr and "Traceback" not in done.stderr


def test_retrain_with_a_budget_stops_and_writes_no_model(files) -> None:
    out = files / "retrained.safetensors"
    done = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(out),
        "--reference-accuracy", "0.97", "--cost-model", str(files / "forecaster.json"), "--budget-kwh", "60",
        "--batch-size", "16", "--no-energy", "--device", "cpu", "--json", cwd=files,
    )
    assert done.returncode == 4, done.stderr
    data = json.loads(done.stdout)
    assert data["status"] == "stopped_by_budget" and data["stopped_by_budget"] is True
    assert {"epochs", "steps", "energy_kwh"} <= set(data)
    assert data["guard"]["estimated_kwh"] > 0 and "beyond the budget of 60 kWh" in data["guard"]["reason"]
    assert data["stop_reason"] == data["guard"]["reason"]  # the sentence, as the pipeline records it
    assert not out.exists()
    assert "torch thread" not in done.stderr  # the rate records no thread count to differ from


def guarded_retrain_at_rate_threads(files, rate_threads: int) -> tuple[list[str], Path]:
    """A guarded CPU retrain's arguments (without --threads), and its cost model, whose rate was fitted at ``rate_threads``."""
    import dataclasses

    forecaster = fitted_forecaster()
    forecaster.energy_rate = dataclasses.replace(forecaster.energy_rate, threads=rate_threads)
    cost_model = files / f"forecaster-{rate_threads}-threads.json"
    forecaster.save(cost_model)
    args = [
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"),
        "--out", str(files / f"t{rate_threads}.safetensors"), "--reference-accuracy", "0.97", "--budget-kwh", "60", "--batch-size", "16",
        "--no-energy", "--json", "--cost-model", str(cost_model), "--device", "cpu",
    ]  # fmt: skip
    return args, cost_model


def test_a_retrain_at_another_thread_count_than_the_rate_says_so(files) -> None:
    args, _ = guarded_retrain_at_rate_threads(files, 64)
    done = shiftcost(*args, cwd=files)
    assert done.returncode == 4, done.stderr
    said = " ".join(done.stderr.split())
    assert "fitted at 64 torch thread(s) and this retrain trains at 1" in said
    assert "give this command --threads 64, or calibrate with --threads 1, to match" in said
    assert json.loads(done.stdout)["torch_threads"] == 1


def test_threads_option_trains_at_the_rates_count_and_the_note_goes(files) -> None:
    args, cost_model = guarded_retrain_at_rate_threads(files, 2)
    done = shiftcost(*args, "--threads", "2", cwd=files)  # OMP_NUM_THREADS=1 in its environment
    assert done.returncode == 4, done.stderr
    assert "torch thread" not in done.stderr
    assert json.loads(done.stdout)["torch_threads"] == 2
    forecast = forecast_args(files, "--no-probe", "--json")
    forecast[forecast.index("--cost-model") + 1] = str(cost_model)
    assert "torch thread" in shiftcost(*forecast, cwd=files).stderr
    assert "torch thread" not in shiftcost(*forecast, "--threads", "2", cwd=files).stderr


def test_a_command_runs_at_its_threads_and_torch_gets_its_count_back() -> None:
    from shiftcost.cli._threads import at_torch_threads

    seen = []
    command = at_torch_threads(lambda *, threads=None: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    command(threads=3)
    command(threads=None)
    assert seen == [3, before] and torch.get_num_threads() == before


def test_a_retrain_on_another_kind_of_device_than_the_rate_says_so(files) -> None:
    import dataclasses

    forecaster = fitted_forecaster()
    forecaster.energy_rate = dataclasses.replace(forecaster.energy_rate, device="cuda", hardware="1 x NVIDIA H200", threads=64)
    forecaster.save(files / "forecaster-cuda.json")
    done = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(files / "d.safetensors"),
        "--reference-accuracy", "0.97", "--budget-kwh", "60", "--batch-size", "16", "--no-energy", "--json",
        "--cost-model", str(files / "forecaster-cuda.json"), "--device", "cpu", cwd=files,
    )
    said = " ".join(done.stderr.split())
    assert done.returncode == 4, done.stderr
    assert "measured on cuda (1 x NVIDIA H200) and this retrain runs on cpu" in said and "calibrate with --device cpu" in said
    assert "torch thread" not in said  # the device is what differs first
    args = forecast_args(files, "--no-probe", "--json")
    args[args.index("--cost-model") + 1] = str(files / "forecaster-cuda.json")
    forecast = shiftcost(*args, cwd=files)
    assert forecast.returncode == 0, forecast.stderr
    assert "measured on cuda (1 x NVIDIA H200)" in " ".join(forecast.stderr.split()) and json.loads(forecast.stdout)["energy_kwh"]


def test_the_guard_prices_each_epoch_at_the_pool_with_its_replayed_reference_samples(files) -> None:
    # A guard that left the replayed samples out would price the rest of the run too low and stop too late.
    done = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(files / "r.safetensors"),
        "--reference", str(files / "reference.npz"), "--replay-fraction", "0.25", "--cost-model", str(files / "forecaster.json"),
        "--budget-kwh", "60", "--batch-size", "16", "--no-energy", "--device", "cpu", "--json", cwd=files,
    )
    assert done.returncode in (0, 3, 4), done.stderr
    samples = len(bars()[1])
    train = samples - round(0.3 * samples)
    assert json.loads(done.stdout)["guard"]["pool_samples"] == train + round(train / 3)


#: A two-step probe beside retrains ten times as long as the shared forecaster's, so that a probe
#: can be cheap beside a budget inside the index interval.
CHEAP_PROBE = {"steps": 2, "samples": 8, "batch_size": 4, "lr": 1e-3, "optimizer": "adam"}


@pytest.fixture(scope="module")
def cheap_probe_forecaster(files):
    forecaster = Forecaster.fit(long_retrain_rows(), features=list(INDEX), max_epochs=200.0, energy_rate=UNIT_RATE, batch_size=16, probe_settings=CHEAP_PROBE)
    assert forecaster.stage1 is not None, forecaster.stage1_error
    return forecaster, forecaster.save(files / "forecaster-cheap-probe.json")


def test_the_guard_probes_only_when_the_probe_can_change_its_first_verdict(files, cheap_probe_forecaster) -> None:
    forecaster, cost_model = cheap_probe_forecaster
    holdout = round(0.3 * len(bars()[1]))

    def guarded(budget: float, *extra: str) -> tuple[dict, str]:
        done = shiftcost(
            "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(files / "g.safetensors"),
            "--reference-stats", str(files / "reference.safetensors"), "--cost-model", str(cost_model), "--budget-kwh", repr(budget),
            "--batch-size", "16", "--max-epochs", "400", "--max-steps", "2", "--no-energy", "--device", "cpu", "--json", *extra, cwd=files,
        )
        assert done.returncode in (0, 3, 4), done.stderr
        return json.loads(done.stdout)["guard"], " ".join(done.stderr.split())

    # The index forecast alone, priced as the pipeline prices it, says where the budget decides.
    index_only, _ = guarded(1e12, "--no-probe")
    assert index_only["initial"]["stage"] == "index" and index_only["probe"] is None and index_only["probe_advice"] is None
    assert index_only["forecasts"][0]["spent_kwh"] == pytest.approx(UNIT_RATE.kwh(0, holdout))
    price = RetrainPrice(index_only["pool_samples"], holdout, 16, UNIT_RATE, 400.0)
    low, high = price.kwh(index_only["initial"]["low"]), price.kwh(index_only["initial"]["high"])
    probe_kwh = price.probe_kwh(forecaster.probe_options())
    straddled = math.sqrt(low * high)
    assert 20 * probe_kwh < straddled  # the probe is cheap beside a budget inside the interval

    # Inside the interval only a probe can tell which side the run falls: it runs, as calibrated,
    # and its cost is already spent at the run's first evaluation (of the holdout alone).
    probed, _ = guarded(straddled)
    assert probed["initial"]["stage"] == "probe" and probed["probe"]["steps"] <= CHEAP_PROBE["steps"]
    assert "straddles" in probed["probe_advice"]
    spent_on_probe = probed["probe"]["estimated_energy_kwh"]
    assert 0 < spent_on_probe <= probe_kwh
    assert probed["forecasts"][0]["spent_kwh"] == pytest.approx(spent_on_probe + UNIT_RATE.kwh(0, holdout))

    # Where the whole interval fits, or none of it does, the probe could not change the verdict: it would only cost.
    for budget, why in ((high * 2, "upper bound fits"), (low / 2, "lower bound exceeds")):
        guard, stderr = guarded(budget)
        assert guard["initial"]["stage"] == "index" and guard["probe"] is None, budget
        assert why in guard["probe_advice"] and f"no probe: {guard['probe_advice']}" in stderr
        assert guard["forecasts"][0]["spent_kwh"] == pytest.approx(UNIT_RATE.kwh(0, holdout))

    # A budget so small that the probe would eat more than its share of it is not probed either.
    costly = CHEAP_PROBE | {"steps": 80, "batch_size": 16}
    dear = Forecaster.fit(long_retrain_rows(), features=list(INDEX), max_epochs=200.0, energy_rate=UNIT_RATE, batch_size=16, probe_settings=costly)
    assert price.probe_kwh(dear.probe_options()) > 0.05 * straddled
    cost_model = dear.save(files / "forecaster-dear-probe.json")
    guard, _ = guarded(straddled)
    assert guard["probe"] is None and "more than 5% of the budget left" in guard["probe_advice"]
    # Unless the user allows the probe that share of the budget.
    share = price.probe_kwh(dear.probe_options()) / straddled
    assert share < 0.5
    guard, _ = guarded(straddled, "--probe-max-share", repr(2 * share))
    assert guard["initial"]["stage"] == "probe" and "straddles" in guard["probe_advice"]


def test_the_guard_needs_both_options(files) -> None:
    done = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(files / "x.pt"),
        "--budget-kwh", "1", "--no-energy", cwd=files,
    )
    assert done.returncode == 2 and "--cost-model" in done.stderr


def test_the_guard_refuses_a_cost_model_calibrated_at_another_batch_size(files) -> None:
    # The forecaster was calibrated on retrains at batch 16; epochs at batch 64 are another quantity.
    out = files / "other-batch.safetensors"
    done = shiftcost(
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"), "--out", str(out),
        "--reference-accuracy", "0.97", "--cost-model", str(files / "forecaster.json"), "--budget-kwh", "60",
        "--batch-size", "64", "--no-energy", "--device", "cpu", cwd=files,
    )
    assert done.returncode == 2, done.stderr
    assert "batch_size 16 (here 64)" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_calibration_guards_a_retrain_like_its_own_and_refuses_another_recipe(files) -> None:
    # The path a user walks: calibrate their model, then retrain under the guard with the
    # calibration's reference statistics as the only source of the target accuracy.
    sweep = [arg for kind in ("contrast=0,0.3,0.5,0.7", "brightness=0,0.2,0.3,0.4", "gaussian_noise=0,0.1,0.2,0.3") for arg in ("--sweep", kind)]
    cal = files / "calibration"
    done = shiftcost(
        "calibrate", "--model", str(files / "model.safetensors"), "--reference", str(files / "reference.npz"),
        "--data", str(files / "batch.npz"), *sweep, "--repeats", "1", "--lr", "0.01", "--out", str(cal), cwd=files,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((cal / "forecaster.json").read_text())["retrain"]["lr"] == 0.01
    # Both stages' error on the batches that needed training, each kind left out, is printed and kept.
    stages = json.loads((cal / "sweep.json").read_text())["loco_stages"]
    probe, index, naive = stages["probe"], stages["index"], stages["constant"]
    printed = " ".join(done.stdout.split())

    def scores(stage: dict) -> str:
        return (f"{100 * stage['mdape_epochs']:.0f}%, {stage['mean_abs_log_error']:.2f}, {100 * stage['coverage_epochs']:.0f}%, "
                f"{stage['censored_definite_misses']} (of {stage['n']}, {stage['n_censored']} capped)")

    assert (
        f"probe stage ({STAGE1_DEFAULT[0]} held at slope 1), leave one corruption kind out, on the batches that needed training: "
        "MdAPE epochs, mean |log error| (capped as bounds), coverage epochs of those that reached "
        f"the cutoff, capped ones that spent more than the upper end {scores(probe)}; "
        f"index stage: {scores(index)}; the other kinds' median epochs (naive): {scores(naive)}."
    ) in printed
    needing_training = [r for r in json.loads((cal / "points.json").read_text()) if not (r["reached_cutoff"] and r["epochs"] == 0)]
    assert probe["n"] == len(needing_training) > 0
    # The verdict is saved with the forecaster, which probes only where probing forecast better.
    saved = Forecaster.load(cal / "forecaster.json")
    assert saved.left_out == stages
    assert ("no better with the probe" in printed) == (probe["mdape_epochs"] >= index["mdape_epochs"]) == (saved.probe_not_worth() is not None)
    report = (cal / "report.md").read_text()
    assert (
        f"| probe | {probe['n']} | {probe['n_censored']} | {100 * probe['mdape_epochs']:.0f}% | {probe['mean_abs_log_error']:.2f} | "
        f"{100 * probe['coverage_epochs']:.0f}% | {probe['censored_definite_misses']} |"
    ) in report
    assert f"| index | {index['n']} | {index['n_censored']} | {100 * index['mdape_epochs']:.0f}% |" in report
    assert ("No probe with this cost model" in report) == (saved.probe_not_worth() is not None)
    # The forecast probes as the calibration's probes did: at the calibrated rate, not the probe's default
    # (asked to probe, as it may not be worth it on these few kinds).
    probed = shiftcost(
        "forecast", "--model", str(files / "model.safetensors"), "--reference-stats", str(cal / "reference.safetensors"),
        "--batch", str(files / "batch.npz"), "--cost-model", str(cal / "forecaster.json"), "--device", "cpu", "--no-energy", "--json",
        "--probe-steps", str(saved.probe_options()["steps"]), cwd=files,
    )
    assert probed.returncode == 0, probed.stderr
    payload = json.loads(probed.stdout)
    assert payload["stage"] == "probe" and payload["probe"]["settings"]["lr"] == 0.01
    # The model file keeps the default recipe, which the pipeline would refuse: the forecast says so.
    said = " ".join(probed.stderr.split())
    assert "This forecasts a retrain with the calibrated settings: the cost model was calibrated on retrains with lr 0.01 (here 0.0001)" in said
    # The costmodel.json `model register` is given reads with the forecaster.json beside it, here
    # too; copied alone, it forecasts epochs only and says which file prices them.
    alone = files / "alone"
    alone.mkdir()
    shutil.copy(cal / "costmodel.json", alone / "costmodel.json")

    def index_forecast(cost_model: Path) -> subprocess.CompletedProcess:
        return shiftcost(
            "forecast", "--model", str(files / "model.safetensors"), "--reference-stats", str(cal / "reference.safetensors"),
            "--batch", str(files / "batch.npz"), "--cost-model", str(cost_model), "--device", "cpu", "--no-probe", "--json", cwd=files,
        )

    named = {path: index_forecast(path) for path in (cal / "forecaster.json", cal / "costmodel.json", alone / "costmodel.json")}
    assert all(done.returncode == 0 for done in named.values()), [done.stderr for done in named.values()]
    paired, beside, lone = (json.loads(done.stdout) for done in named.values())
    assert paired["energy_kwh"] is not None and paired["co2_kg"] is not None
    assert {key: beside[key] for key in ("epochs", "energy_kwh", "co2_kg")} == {key: paired[key] for key in ("epochs", "energy_kwh", "co2_kg")}
    assert lone["epochs"] == paired["epochs"] and lone["energy_kwh"] is None and lone["co2_kg"] is None
    said = " ".join(named[alone / "costmodel.json"].stderr.split())
    assert f"{alone / 'costmodel.json'} holds no energy rate for this host" in said and "forecaster.json" in said
    assert "energy rate" not in named[cal / "costmodel.json"].stderr
    common = [
        "retrain", "--model", str(files / "model.safetensors"), "--batch", str(files / "batch.npz"),
        "--reference-stats", str(cal / "reference.safetensors"), "--cost-model", str(cal / "forecaster.json"),
        "--budget-kwh", "1", "--no-energy", "--max-epochs", "1", "--device", "cpu",
    ]
    # Calibration replayed half of each epoch from the labelled reference, as the default recipe
    # does when it has one; a retrain without it would replay nothing and take other epochs.
    unreplayed = shiftcost(*common, "--lr", "0.01", "--out", str(files / "unreplayed.safetensors"), cwd=files)
    refused = " ".join(unreplayed.stderr.split())
    assert unreplayed.returncode == 2 and "replay_fraction 0.5 (here 0.0)" in refused and "replaying needs the labelled reference data: give it with --reference DATA" in refused
    assert "Traceback" not in refused
    assert not (files / "unreplayed.safetensors").exists()
    common += ["--reference", str(files / "reference.npz")]
    same = shiftcost(*common, "--lr", "0.01", "--out", str(files / "same.safetensors"), "--json", cwd=files)
    assert same.returncode in (0, 3), same.stderr
    assert json.loads(same.stdout)["status"] in ("reached", "already_met", "cap_reached")
    other = shiftcost(*common, "--out", str(files / "other.safetensors"), "--lr", "0.05", cwd=files)
    assert other.returncode == 2 and "lr" in other.stderr and "(here 0.05)" in other.stderr and "Traceback" not in other.stderr
    assert not (files / "other.safetensors").exists()
    unpriced = [str(alone / "costmodel.json") if arg == str(cal / "forecaster.json") else arg for arg in common]
    unguarded = shiftcost(*unpriced, "--lr", "0.01", "--out", str(files / "unguarded.safetensors"), cwd=files)
    refused = " ".join(unguarded.stderr.split())
    assert unguarded.returncode == 2 and "so a budget in kWh cannot be guarded" in refused and "forecaster.json" in refused
    assert "Traceback" not in refused and not (files / "unguarded.safetensors").exists()


def test_a_forecast_held_at_the_horizon_reads_as_at_least_that_many(files) -> None:
    from shiftcost.cli.assess import _epochs_text

    fitted_forecaster(cap=0.1).save(files / "forecaster-short-cap.json")
    args = forecast_args(files, "--no-probe", "--no-energy")
    args[args.index(str(files / "forecaster.json"))] = str(files / "forecaster-short-cap.json")
    done = shiftcost(*args, cwd=files)
    assert done.returncode == 0, done.stderr
    assert "read it as 0.3 epochs or more" in " ".join(done.stderr.split())
    # The assessment's table says the same of a prediction held at three caps, and nothing of one inside them.
    assert _epochs_text({"epochs": 45.0, "epochs_lower": 45.0, "epochs_upper": 45.0, "max_epochs": 15.0}).startswith("45 or more")
    assert _epochs_text({"epochs": 4.0, "epochs_lower": 2.0, "epochs_upper": 45.0, "max_epochs": 15.0}) == "4  [2, 45]"
