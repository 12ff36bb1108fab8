"""The probe: its cost accounting, its trajectory, and that it leaves the model alone."""

from __future__ import annotations

import copy

import pytest
import torch

from shiftcost.data.demo import train_classifier
from shiftcost.data.models import build_model
from shiftcost.energy import EVAL_SAMPLE_WEIGHT, HostEnergyRate
from shiftcost.forecast import protocol
from shiftcost.forecast import probe as probing
from shiftcost.forecast.probe import PROBE_STRATUM, RATE_SCALINGS, calibration_scalings, probe_features, run_probe
from tests.forecast.helpers import bars

#: 7.2 J per sample-gradient and 3.6 J per run: the probe is one measured run and pays its overhead once.
RATE = HostEnergyRate(7.2, 0.0, 1, overhead_joules=3.6)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = bars()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, spec = build_model("digits_cnn", 3, in_channels=1, image_size=8)
    train_classifier(model, x, y, epochs=8, batch_size=16, lr=1e-2)
    yield model, spec, x, y
    torch.set_num_threads(threads)


def test_probe_cost_is_counted_exactly_and_the_model_is_untouched(tiny) -> None:
    model, _, x, y = tiny
    shifted = (1 - x).contiguous()  # inverted images: the model must relearn
    before = copy.deepcopy(model.state_dict())
    rng_state = torch.get_rng_state()
    probe = run_probe(
        model, shifted, y, target_accuracy=0.9, ceiling=0.95, steps=6, samples=40, batch_size=8, retrain_batch_size=8, energy_rate=RATE
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng_state, torch.get_rng_state())
    holdout = round(len(y) * 0.3)
    assert probe.holdout_samples == holdout and probe.pool_samples == len(y) - holdout
    cost = probe.cost
    assert cost.steps == 6 and cost.sample_gradients == 6 * 8
    assert cost.samples_evaluated == 7 * holdout
    assert cost.energy_kwh == pytest.approx((3.6 + 7.2 * (48 + EVAL_SAMPLE_WEIGHT * 7 * holdout)) / 3.6e6) and not cost.energy_measured
    assert len(probe.accuracy) == len(probe.loss) == len(probe.epochs) == 7
    assert probe.initial_grad_norm > 0 and probe.loss[-1] < probe.loss[0]


def test_the_probe_runs_on_the_retrain_clock(tiny) -> None:
    """Probe step ``k`` sits at ``k`` retrain steps at the retrain's rate, and at ``k * batch_size /
    retrain_batch_size`` where the rate follows the batch, whatever the probe's own batch size."""
    model, _, x, y = tiny
    for batch_size, retrain_batch_size in ((8, 64), (8, 16), (32, 16)):
        for scaling in RATE_SCALINGS:
            probe = run_probe(
                model, 1 - x, y, target_accuracy=0.9, ceiling=0.95, steps=5, samples=64, batch_size=batch_size,
                retrain_batch_size=retrain_batch_size, rate_scaling=scaling,
            )
            share = 1.0 if scaling == "none" else batch_size / retrain_batch_size
            per_epoch = protocol.steps_per_epoch(probe.pool_samples, retrain_batch_size)
            assert probe.epochs == pytest.approx([k * share / per_epoch for k in range(6)])
            assert probe.settings["retrain_batch_size"] == retrain_batch_size and probe.settings["rate_scaling"] == scaling


def test_calibration_probes_at_the_retrains_rate_and_where_it_chooses_under_the_rule_for_its_optimizer(monkeypatch) -> None:
    from shiftcost.forecast import probe as probing
    from shiftcost.recipe import OPTIMIZERS

    assert {optimizer: calibration_scalings(optimizer) for optimizer in OPTIMIZERS} == dict.fromkeys(OPTIMIZERS, ("none",))
    monkeypatch.setattr(probing, "CHOOSE_RATE_SCALING", True)
    assert {optimizer: calibration_scalings(optimizer) for optimizer in OPTIMIZERS} == {
        "sgd": ("none", "linear"), "adam": ("none", "sqrt"), "adamw": ("none", "sqrt"),
    }
    monkeypatch.setattr(probing, "RATE_SCALING", "sqrt")
    assert calibration_scalings("adam") == ("sqrt",)  # the default is its optimizer's rule: nothing to choose


@pytest.mark.parametrize(("scaling", "rate_factor"), [("linear", 1 / 4), ("sqrt", 1 / 2)])
def test_a_scaled_probe_is_the_plain_probe_at_the_scaled_rate_on_the_sample_clock(tiny, scaling, rate_factor) -> None:
    """Four steps of 8 images stand for one retrain step of 32: the same curve as a probe at the
    scaled rate, each of its steps counted as a quarter step."""
    model, _, x, y = tiny
    options = dict(target_accuracy=1.01, ceiling=1.0, steps=5, samples=40, batch_size=8, retrain_batch_size=32, seed=2)
    scaled = run_probe(model, 1 - x, y, lr=1e-2, rate_scaling=scaling, **options)
    plain = run_probe(model, 1 - x, y, lr=1e-2 * rate_factor, rate_scaling="none", **options)
    at_full_rate = run_probe(model, 1 - x, y, lr=1e-2, rate_scaling="none", **options)
    assert scaled.accuracy == plain.accuracy and scaled.loss == plain.loss
    assert scaled.epochs == pytest.approx([e / 4 for e in plain.epochs])
    assert scaled.loss != at_full_rate.loss
    # The rate recorded is the recipe's, which is what a forecaster checks a probe against.
    assert scaled.settings["lr"] == 1e-2


def test_an_unknown_rate_scaling_is_refused_in_one_sentence(tiny) -> None:
    from shiftcost.errors import ConfigError

    model, _, x, y = tiny
    with pytest.raises(ConfigError, match="rate scaling must be one of none, linear, sqrt, got 'cubic'"):
        run_probe(model, x, y, target_accuracy=0.9, ceiling=0.95, rate_scaling="cubic")


def test_the_probes_evaluations_read_at_most_max_holdout_images(tiny) -> None:
    model, _, x, y = tiny
    holdout = round(len(y) * 0.3)
    noisy = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # neither lost nor learnt at once
    args = dict(target_accuracy=0.99, ceiling=0.99, steps=4, samples=40, batch_size=8, energy_rate=RATE)
    whole = run_probe(model, noisy, y, **args)
    capped = run_probe(model, noisy, y, max_holdout=10, **args)
    # Every evaluation reads ten of the held-out images, the same ten each time, whatever it saw.
    assert capped.holdout_samples == 10 and capped.cost.samples_evaluated == 5 * 10 and capped.settings["max_holdout"] == 10
    assert all(round(a * 10, 9) == round(a * 10) for a in capped.accuracy) and capped.accuracy != whole.accuracy
    assert 0 < min(whole.accuracy) < max(whole.accuracy) < 1
    assert capped.cost.estimated_energy_kwh < whole.cost.estimated_energy_kwh
    # It trains as the uncapped probe does: the cap changes what is read, not the steps.
    assert capped.cost.sample_gradients == whole.cost.sample_gradients and capped.initial_grad_norm == whole.initial_grad_norm
    # A cap above the holdout changes nothing.
    loose = run_probe(model, noisy, y, max_holdout=holdout + 1, **args)
    assert loose.holdout_samples == whole.holdout_samples == holdout
    assert loose.accuracy == whole.accuracy and loose.loss == whole.loss
    assert capped.accuracy == run_probe(model, noisy, y, max_holdout=10, **args).accuracy


def test_the_same_seed_gives_the_same_probe(tiny) -> None:
    model, _, x, y = tiny
    a = run_probe(model, 1 - x, y, target_accuracy=0.9, ceiling=0.95, steps=4, seed=3)
    b = run_probe(model, 1 - x, y, target_accuracy=0.9, ceiling=0.95, steps=4, seed=3)
    assert a.accuracy == b.accuracy and a.loss == b.loss and a.grad_noise_scale == b.grad_noise_scale


def test_a_measured_probe_keeps_its_estimate_beside_the_measurement(tiny) -> None:
    model, _, x, y = tiny
    probe = run_probe(
        model, 1 - x, y, target_accuracy=0.9, ceiling=0.95, steps=4, samples=40, batch_size=8, energy_rate=RATE,
        track_energy=True, energy_options={"measure_power_secs": 0.2},
    )
    cost = probe.cost
    holdout = round(len(y) * 0.3)
    assert cost.energy_measured and cost.energy_kwh > 0
    assert cost.estimated_energy_kwh == pytest.approx((3.6 + 7.2 * (4 * 8 + EVAL_SAMPLE_WEIGHT * 5 * holdout)) / 3.6e6)
    assert cost.to_dict()["estimated_energy_kwh"] == cost.estimated_energy_kwh


def test_batch_norm_statistics_follow_the_probes_batches(tiny) -> None:
    """At a learning rate too small to move a weight, only batch-norm statistics can change the
    held-out loss; they follow the shifted batches at every step, not only the first."""
    model, _, x, y = tiny
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    probe = run_probe(
        model, 1 - x, y, target_accuracy=1.01, ceiling=1.0, steps=4, samples=40, batch_size=8, lr=1e-30, optimizer="sgd", momentum=0.0
    )
    assert all(abs(later - earlier) > 1e-4 for earlier, later in zip(probe.loss, probe.loss[1:]))


def test_the_probe_decays_weights_as_the_recipe_does(tiny) -> None:
    model, _, x, y = tiny
    options = dict(target_accuracy=1.01, ceiling=1.0, steps=3, samples=40, batch_size=8, lr=1e-2, optimizer="sgd")
    plain = run_probe(model, 1 - x, y, **options)
    decayed = run_probe(model, 1 - x, y, weight_decay=0.5, **options)
    assert plain.loss[0] == decayed.loss[0] and plain.loss[-1] != decayed.loss[-1]
    assert decayed.settings["weight_decay"] == 0.5


def test_the_probe_stops_at_its_first_evaluation_that_meets_the_cutoff(tiny) -> None:
    """Stopped, the probe is the unstopped probe's prefix up to the first evaluation where the
    retrains' rule holds, and costs only the steps it took; the crossing stage 1 reads is the same."""
    model, _, x, y = tiny
    options = dict(ceiling=1.0, steps=12, samples=64, batch_size=8, retrain_batch_size=8, seed=1, energy_rate=RATE)
    full = run_probe(model, 1 - x, y, target_accuracy=1.01, stop_at_cutoff=False, **options)
    assert len(full.accuracy) == 13
    first_met = {t: protocol.first_cutoff(full.accuracy, t) for t in sorted(set(full.accuracy))}
    chosen = {t: k for t, k in first_met.items() if k is not None and 0 < k < 12}
    assert chosen, f"no target is met mid-way on this trajectory: {full.accuracy}"
    holdout = full.holdout_samples
    for target, k in chosen.items():
        stopped = run_probe(model, 1 - x, y, target_accuracy=target, **options)
        assert stopped.accuracy == full.accuracy[: k + 1] and stopped.loss == full.loss[: k + 1] and stopped.epochs == full.epochs[: k + 1]
        assert (stopped.cost.steps, stopped.cost.sample_gradients, stopped.cost.samples_evaluated) == (k, 8 * k, (k + 1) * holdout)
        assert stopped.settings["steps"] == 12 and stopped.settings["stop_at_cutoff"]
        read = [probe_features(p.epochs, p.accuracy, p.loss, target=target, ceiling=1.0, cap_epochs=15.0)["cutoff_log_epochs"] for p in (stopped, full)]
        assert read[0] == read[1]


def test_a_batch_already_at_the_cutoff_costs_the_probe_one_evaluation(tiny) -> None:
    model, _, x, y = tiny
    probe = run_probe(model, x, y, target_accuracy=0.5, ceiling=1.0, steps=6, samples=40, batch_size=8, energy_rate=RATE)
    assert probe.accuracy[0] >= 0.5 and len(probe.accuracy) == 1
    cost = probe.cost
    assert (cost.steps, cost.sample_gradients, cost.samples_evaluated) == (0, 0, probe.holdout_samples)
    assert cost.energy_kwh == pytest.approx((3.6 + 7.2 * EVAL_SAMPLE_WEIGHT * probe.holdout_samples) / 3.6e6)
    assert probe.initial_grad_norm is None and probe.grad_noise_scale is None


def test_the_stratum_says_whether_the_probes_own_evaluations_met_the_cutoff_after_training() -> None:
    epochs = [0.1 * k for k in range(7)]
    loss = [1.0 - 0.1 * k for k in range(7)]
    read = {
        "met after training": [0.5, 0.6, 0.7, 0.9, 0.9, 0.9, 0.9],
        "never met, its crossing extrapolated": [0.5, 0.55, 0.6, 0.65, 0.7, 0.72, 0.74],
        "met at the first evaluation": [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
        "met by one lucky evaluation only": [0.5, 0.6, 0.9, 0.6, 0.65, 0.7, 0.7],
    }
    strata = {
        name: probe_features(epochs, accuracy, loss, target=0.85, ceiling=0.9, cap_epochs=15.0)[PROBE_STRATUM] for name, accuracy in read.items()
    }
    assert strata == {
        "met after training": 1.0, "never met, its crossing extrapolated": 0.0, "met at the first evaluation": 0.0,
        "met by one lucky evaluation only": 0.0,
    }


def test_the_first_step_gain_is_how_far_the_first_step_moved_the_held_out_accuracy() -> None:
    loss = [1.0, 0.9, 0.8, 0.7]
    gains = [
        probe_features([0.1 * k for k in range(len(accuracy))], accuracy, loss[: len(accuracy)], target=0.85, ceiling=0.9, cap_epochs=15.0)[
            "probe_first_step_gain"
        ]
        for accuracy in ([0.5, 0.6, 0.84, 0.86], [0.7, 0.65, 0.8, 0.8], [0.9])
    ]
    assert gains == pytest.approx([0.1, -0.05, 0.0])


def test_the_initial_gap_is_how_far_the_model_before_any_step_lies_below_the_target() -> None:
    epochs = [0.1 * k for k in range(4)]
    loss = [1.0, 0.9, 0.8, 0.7]
    gaps = [
        probe_features(epochs, [first, 0.8, 0.84, 0.86], loss, target=0.85, ceiling=0.9, cap_epochs=15.0)["probe_initial_gap"]
        for first in (0.5, 0.7, 0.9)
    ]
    assert gaps == pytest.approx([0.35, 0.15, -0.05])


def _normalised_on_entry() -> torch.nn.Module:
    """A classifier of 8x8 one-channel images whose first layer is batch norm on its input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 3))


def test_the_batch_norm_reading_undoes_a_shift_that_new_statistics_alone_undo(monkeypatch) -> None:
    """Brightened images of lower contrast, normalised on entry by statistics estimated on
    them, are the original images normalised by theirs: the reading on the shifted batch is the
    reading on the original one, while the model with its old statistics loses accuracy."""
    monkeypatch.setattr(probing, "BN_READING", True)
    x, y = bars()
    model = _normalised_on_entry()
    train_classifier(model, x, y, epochs=8, batch_size=16, lr=1e-2)
    shifted = 0.2 * x + 1.0
    options = dict(target_accuracy=1.01, ceiling=1.0, steps=2, samples=40, batch_size=8)
    on_shifted, on_original = run_probe(model, shifted, y, **options), run_probe(model, x, y, **options)
    assert on_shifted.accuracy[0] < on_original.accuracy[0] - 0.2
    assert on_shifted.bn_adapted_accuracy == pytest.approx(on_original.bn_adapted_accuracy, abs=1e-9)
    assert on_shifted.bn_adapted_accuracy > on_shifted.accuracy[0] + 0.2
    read = probe_features(
        on_shifted.epochs, on_shifted.accuracy, on_shifted.loss, target=1.01, ceiling=1.0, cap_epochs=15.0,
        bn_adapted_accuracy=on_shifted.bn_adapted_accuracy,
    )
    assert read["probe_bn_gain"] == pytest.approx(on_shifted.bn_adapted_accuracy - on_shifted.accuracy[0])


def test_the_batch_norm_reading_leaves_the_walk_alone_and_is_charged(tiny, monkeypatch) -> None:
    model, _, x, y = tiny
    options = dict(target_accuracy=1.01, ceiling=1.0, steps=3, samples=40, batch_size=8, seed=2)
    plain = run_probe(model, 1 - x, y, **options)
    monkeypatch.setattr(probing, "BN_READING", True)
    read = run_probe(model, 1 - x, y, **options)
    assert (read.accuracy, read.loss, read.grad_noise_scale) == (plain.accuracy, plain.loss, plain.grad_noise_scale)
    assert plain.bn_adapted_accuracy is None and 0.0 <= read.bn_adapted_accuracy <= 1.0
    assert read.cost.samples_evaluated == plain.cost.samples_evaluated + 40 + read.holdout_samples
    without_norms = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    assert run_probe(without_norms, x, y, **options).bn_adapted_accuracy is None
    assert probe_features([0.0], [0.5], [1.0], target=0.9, ceiling=1.0, cap_epochs=15.0)["probe_bn_gain"] == 0.0


def test_plain_average_statistics_forget_the_models_old_ones_after_the_first_step(tiny, monkeypatch) -> None:
    """With the running statistics a plain average over the probe's batches, what the model's
    statistics were before the probe moves only its first evaluation; with the recipe's
    exponential average it moves every one."""
    model, _, x, y = tiny
    skewed = copy.deepcopy(model)
    for norm in probing._batch_norms(skewed):
        norm.running_mean.add_(0.5)
        norm.running_var.mul_(3.0)
    options = dict(target_accuracy=1.01, ceiling=1.0, steps=3, samples=40, batch_size=8, seed=2)
    exponential = [run_probe(m, 1 - x, y, **options).loss for m in (model, skewed)]
    monkeypatch.setattr(probing, "BN_RUNNING_AVERAGE", True)
    average = [run_probe(m, 1 - x, y, **options).loss for m in (model, skewed)]
    assert average[0][0] != average[1][0] and average[0][1:] == pytest.approx(average[1][1:], abs=1e-6)
    assert all(abs(a - b) > 1e-4 for a, b in zip(exponential[0][1:], exponential[1][1:]))


def test_a_stage_1_that_reads_the_batch_norm_gain_refuses_a_probe_without_the_reading(tiny, monkeypatch) -> None:
    from shiftcost.errors import ConfigError
    from shiftcost.forecast.forecaster import Forecaster
    from tests.forecast.helpers import INDEX, forecast_rows

    model, _, x, y = tiny
    rows = [row | {"probe_bn_gain": 0.05 * row["cutoff_log_epochs"]} for row in forecast_rows()]
    forecaster = Forecaster.fit(
        rows, features=list(INDEX), max_epochs=15.0, stage1_features=("cutoff_log_epochs", "probe_bn_gain"), stage1_offsets=("cutoff_log_epochs",),
    )
    features = {name: rows[0][name] for name in INDEX}
    options = dict(target_accuracy=1.01, ceiling=1.0, steps=2, samples=40, batch_size=8)
    with pytest.raises(ConfigError, match="batch-norm reading"):
        forecaster.predict(features, probe=run_probe(model, 1 - x, y, **options))
    monkeypatch.setattr(probing, "BN_READING", True)
    assert forecaster.predict(features, probe=run_probe(model, 1 - x, y, **options)).stage == "probe"
