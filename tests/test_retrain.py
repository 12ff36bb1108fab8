"""Retraining to a cutoff accuracy, with tiny real models and the real CodeCarbon tracker."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.errors import ConfigError, InputError
from shiftcost.forecast import protocol
from shiftcost.retrain import RetrainError, RetrainInterrupted, RetrainResult, retrain_to_cutoff

FAST = {"energy_options": {"measure_power_secs": 0.2}}


@pytest.fixture(autouse=True)
def one_torch_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so a stray emissions.csv would be seen
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    assert list(tmp_path.iterdir()) == []


def separable(n: int = 400, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, (x @ w > 0).long(), w


def wrong_linear(w: torch.Tensor) -> nn.Linear:
    """A linear classifier that starts out predicting the opposite class: it must learn."""
    model = nn.Linear(len(w), 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([w, -w]) * 0.5)
        model.bias.zero_()
    return model


def independent_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Slow, separate accuracy: one sample at a time, float64 copy of a linear model."""
    weight = model.weight.detach().double().cpu()
    bias = model.bias.detach().double().cpu()
    correct = 0
    for xi, yi in zip(x.double(), y):
        scores = weight @ xi + bias
        correct += int(int(scores.argmax()) == int(yi))
    return correct / len(y)


# A 0.2 holdout (not the protocol's 0.3) leaves 320 of 400 samples for training: batches of 32 exactly.
SGD = dict(eval_every=2, batch_size=32, lr=0.02, optimizer="sgd", holdout_fraction=0.2)


def test_stops_exactly_at_the_first_evaluation_reaching_the_target() -> None:
    x, y, w = separable()
    model = wrong_linear(w)
    result = retrain_to_cutoff(model, x, y, target_accuracy=0.9, **SGD, **FAST)
    assert result.status == "reached" and result.reached_cutoff
    accuracies = [p.accuracy for p in result.curve]
    assert len(accuracies) >= 4, "the constructed case should need several evaluations"
    # The cutoff is the protocol's (the mean of the last CUTOFF_WINDOW evaluations and the latest
    # one meet the target), written out here: met at the last evaluation and at none before.
    window = protocol.CUTOFF_WINDOW

    def met(k: int) -> bool:
        recent = accuracies[max(0, k + 1 - window) : k + 1]
        return accuracies[k] >= 0.9 and sum(recent) / len(recent) >= 0.9

    assert met(len(accuracies) - 1) and not any(met(k) for k in range(len(accuracies) - 1))
    assert result.steps == result.curve[-1].step and result.steps % 2 == 0
    assert [p.step for p in result.curve] == list(range(0, result.steps + 1, 2))

    hold = torch.tensor(result.holdout_indices)
    # The returned model really has the reported accuracy at the stopping step ...
    assert independent_accuracy(result.model, x[hold], y[hold]) == pytest.approx(result.final_accuracy)
    assert result.final_accuracy == accuracies[-1]
    # ... and an independent run capped one evaluation earlier really had that accuracy (not the cutoff).
    earlier = retrain_to_cutoff(model, x, y, target_accuracy=0.9, max_steps=result.steps - 2, **SGD, track_energy=False)
    assert earlier.status == "cap_reached" and earlier.steps == result.steps - 2
    assert independent_accuracy(earlier.model, x[hold], y[hold]) == pytest.approx(accuracies[-2])

    # Fractional epochs: samples seen / training samples.
    assert result.train_samples + result.holdout_samples == len(x)
    assert result.epochs == pytest.approx(result.samples_seen / result.train_samples)
    assert result.samples_seen == result.steps * 32  # 320 training samples: batches of 32 exactly
    assert result.energy is not None and result.energy.energy_kwh > 0 and result.emissions_kg > 0


def test_parameter_change_is_zero_when_already_met() -> None:
    x, y, w = separable()
    model = wrong_linear(-w)  # already right
    result = retrain_to_cutoff(model, x, y, target_accuracy=0.9, **SGD, **FAST)
    assert result.status == "already_met" and result.reached_cutoff
    assert result.steps == 0 and result.epochs == 0 and result.samples_seen == 0
    assert result.param_change == 0.0 and result.param_change_l2 == 0.0
    assert set(result.param_change_per_layer.values()) == {0.0}
    assert result.mean_grad_norm is None and result.grad_norms == []
    assert len(result.curve) == 1 and result.curve[0].accuracy >= 0.9
    assert result.energy is not None  # the check itself was measured


def test_cap_reached_is_recorded_as_not_reached_with_its_cost() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    y = torch.randint(0, 3, (200,), generator=g)  # random labels: the target is out of reach
    model = nn.Linear(8, 3)
    result = retrain_to_cutoff(model, x, y, target_accuracy=1.0, max_steps=7, eval_every=3, batch_size=16, **FAST)
    assert result.status == "cap_reached" and not result.reached_cutoff
    assert result.steps == 7 and [p.step for p in result.curve] == [0, 3, 6, 7]  # the last step is evaluated
    assert result.final_accuracy < 1.0
    assert result.energy.energy_kwh > 0 and result.param_change > 0 and result.wall_time_s > 0


def test_epoch_cap_allows_fractions() -> None:
    x, _, _ = separable(n=200)
    y = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(5))  # unlearnable
    result = retrain_to_cutoff(
        nn.Linear(8, 2), x, y, target_accuracy=1.0, max_epochs=1.5, batch_size=32, holdout_fraction=0.2, track_energy=False
    )
    # 160 training samples, batches of 32: 5 steps per epoch, so 1.5 epochs = 8 steps.
    assert result.steps_per_epoch == 5 and result.steps == 8 and result.status == "cap_reached"
    assert result.epochs == pytest.approx(8 * 32 / 160)


def test_parameter_change_and_gradient_norm_match_independent_computation() -> None:
    x, y, w = separable(n=100)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2))
    result = retrain_to_cutoff(model, x, y, target_accuracy=1.0, max_steps=4, eval_every=1, batch_size=16, lr=0.05, track_energy=False)
    before = dict(model.named_parameters())
    after = dict(result.model.named_parameters())  # on the run's device: CUDA where there is one
    deltas = {name: (after[name].detach().cpu().double() - before[name].detach().double()).flatten() for name in before}
    flat = torch.cat(list(deltas.values()))
    assert result.param_change == pytest.approx(float(flat.norm()) / math.sqrt(flat.numel()), rel=1e-9)
    assert result.n_parameters == flat.numel() == 8 * 6 + 6 + 6 * 2 + 2
    for layer in ("0", "2"):
        part = torch.cat([deltas[f"{layer}.weight"], deltas[f"{layer}.bias"]])
        assert result.param_change_per_layer[layer] == pytest.approx(float(part.norm()) / math.sqrt(part.numel()), rel=1e-9)

    # First step's gradient norm, recomputed by hand on the first shuffled mini-batch.
    hold = set(result.holdout_indices)
    train_idx = torch.tensor([i for i in range(len(x)) if i not in hold])
    first = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(0))[:16]
    fresh = copy.deepcopy(model)
    F.cross_entropy(fresh(x[train_idx][first]), y[train_idx][first]).backward()
    grad = torch.cat([p.grad.flatten() for p in fresh.parameters()])
    assert result.curve[1].grad_norm == pytest.approx(float(grad.norm()), rel=1e-5)
    assert len(result.grad_norms) == 4 and result.mean_grad_norm == pytest.approx(sum(result.grad_norms) / 4)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_same_seed_same_run_and_caller_state_untouched() -> None:
    x, y, _ = separable(n=200, seed=3)
    torch.manual_seed(0)
    model = DropoutNet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    runs = [retrain_to_cutoff(model, x, y, target_accuracy=0.97, max_steps=30, eval_every=3, batch_size=16, seed=7, track_energy=False) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    a, b = runs
    assert a.steps == b.steps and a.status == b.status
    assert [(p.step, p.accuracy, p.loss, p.grad_norm) for p in a.curve] == [(p.step, p.accuracy, p.loss, p.grad_norm) for p in b.curve]
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    other = retrain_to_cutoff(model, x, y, target_accuracy=0.97, max_steps=30, eval_every=3, batch_size=16, seed=8, track_energy=False)
    assert other.holdout_indices != a.holdout_indices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_run_on_cuda_with_a_convolutional_model() -> None:
    from shiftcost.data.models import build_model

    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 3, 32, 32, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > x[:, 1].mean(dim=(1, 2))).long()
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 2, in_channels=3, image_size=32)
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    runs = [
        retrain_to_cutoff(model, x, y, target_accuracy=1.0, max_steps=40, eval_every=5, batch_size=64, seed=7, track_energy=False, device="cuda")
        for _ in range(2)
    ]
    a, b = runs
    assert [(p.step, p.accuracy, p.loss) for p in a.curve] == [(p.step, p.accuracy, p.loss) for p in b.curve]
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == flags


def test_a_fixed_holdout_seed_judges_every_seed_on_the_same_samples() -> None:
    x, y, _ = separable(n=200, seed=3)
    torch.manual_seed(0)
    model = DropoutNet()
    settings = {"target_accuracy": 0.97, "max_steps": 12, "eval_every": 3, "batch_size": 16, "track_energy": False}
    a = retrain_to_cutoff(model, x, y, seed=7, holdout_seed=100, **settings)
    b = retrain_to_cutoff(model, x, y, seed=8, holdout_seed=100, **settings)
    assert a.holdout_indices == b.holdout_indices
    assert a.holdout_indices == retrain_to_cutoff(model, x, y, seed=100, **settings).holdout_indices
    # ... while the training still differs with the seed.
    assert [p.loss for p in a.curve] != [p.loss for p in b.curve]


class FailsAfter(nn.Module):
    """A real model whose forward raises (or returns NaN) after a number of training calls."""

    def __init__(self, calls: int, failure: str = "raise") -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)
        self.calls = calls
        self.failure = failure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.calls == 0:
                if self.failure == "raise":
                    raise RuntimeError("device lost")
                if self.failure == "interrupt":
                    raise KeyboardInterrupt
                return self.linear(x) * float("nan")
            self.calls -= 1
        return self.linear(x)


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_crash_mid_run_keeps_partial_measurements(failure: str) -> None:
    x, y, _ = separable(n=200)
    with pytest.raises(RetrainError) as caught:
        retrain_to_cutoff(FailsAfter(5, failure), x, y, target_accuracy=1.0, max_steps=50, eval_every=2, batch_size=16, **FAST)
    partial = caught.value.partial
    assert partial.status == "failed" and not partial.reached_cutoff
    assert partial.steps == 5 and partial.samples_seen == 5 * 16
    assert [p.step for p in partial.curve] == [0, 2, 4]
    assert partial.energy is not None and partial.energy.energy_kwh > 0
    assert partial.param_change > 0
    if failure == "raise":
        assert isinstance(caught.value.__cause__, RuntimeError) and "device lost" in partial.error
    else:
        assert "nan" in partial.error.lower() and "learning rate" in str(caught.value)
    json.dumps(partial.to_dict(), allow_nan=False)


def test_interrupt_keeps_partial_and_stays_a_keyboard_interrupt() -> None:
    x, y, _ = separable(n=200)
    with pytest.raises(RetrainInterrupted) as caught:
        retrain_to_cutoff(FailsAfter(3, "interrupt"), x, y, target_accuracy=1.0, max_steps=50, batch_size=16, **FAST)
    assert isinstance(caught.value, KeyboardInterrupt) and not isinstance(caught.value, Exception)
    assert caught.value.partial.steps == 3 and caught.value.partial.energy.energy_kwh > 0
    # A bare Ctrl-C has no message: the record names it without an empty one after it.
    assert caught.value.partial.error == "KeyboardInterrupt"
    assert str(caught.value).startswith("retraining stopped after 3 steps (KeyboardInterrupt); cost so far")


def test_batch_without_labels_is_refused() -> None:
    x, _, _ = separable(n=50)
    with pytest.raises(InputError, match="retraining needs labels; batch_7.npz has none"):
        retrain_to_cutoff(nn.Linear(8, 2), x, None, target_accuracy=0.9, source="batch_7.npz")


def test_too_few_samples_for_a_holdout_is_refused() -> None:
    x, y, _ = separable(n=12)
    with pytest.raises(InputError, match="too few for a held-out split"):
        retrain_to_cutoff(nn.Linear(8, 2), x, y, target_accuracy=0.9, track_energy=False)


def test_bad_settings_are_refused() -> None:
    x, y, _ = separable(n=100)
    with pytest.raises(ConfigError, match="target accuracy"):
        retrain_to_cutoff(nn.Linear(8, 2), x, y, target_accuracy=90, track_energy=False)
    with pytest.raises(InputError, match="no target accuracy"):
        retrain_to_cutoff(nn.Linear(8, 2), x, y, track_energy=False)
    with pytest.raises(InputError, match="only 2 outputs"):
        retrain_to_cutoff(nn.Linear(8, 2), x, y + 2, target_accuracy=0.9, track_energy=False)
    with pytest.raises(ConfigError, match="optimizer"):
        retrain_to_cutoff(nn.Linear(8, 2), x, y, target_accuracy=0.9, optimizer="lbfgs", track_energy=False)


def test_target_defaults_to_reference_accuracy_minus_tolerance_and_replay_mixes_reference() -> None:
    x, y, w = separable(n=200, seed=4)
    ref_x, ref_y, _ = separable(n=300, seed=4)
    ref_y = (ref_x @ w > 0).long()
    model = nn.Linear(8, 2)
    with torch.no_grad():  # right on most samples, not all
        model.weight.copy_(torch.stack([-w, w + 0.8 * torch.randn(8, generator=torch.Generator().manual_seed(9))]) * 0.5)
        model.bias.zero_()
    result = retrain_to_cutoff(
        model, x, y, reference_x=ref_x, reference_y=ref_y, replay_fraction=0.25, tolerance=0.05,
        max_steps=5, batch_size=16, holdout_fraction=0.2, track_energy=False,
    )
    expected_reference = independent_accuracy(model, ref_x, ref_y)
    assert 0.6 < expected_reference < 1.0
    assert result.reference_accuracy == pytest.approx(expected_reference)
    assert result.target_accuracy == pytest.approx(expected_reference - 0.05)
    # Replay makes up a quarter of the pool: 160 new training samples + 53 reference ones.
    assert result.train_samples == 160 and result.replay_samples == round(0.25 / 0.75 * 160)
    assert result.pool_samples == 160 + result.replay_samples


def test_a_model_no_better_than_chance_on_its_reference_is_refused_in_one_sentence() -> None:
    """Its target would sit at chance, which it meets at once: the run would say ``already_met``."""
    x, y, w = separable(n=200, seed=5)
    model = nn.Linear(8, 2)
    with torch.no_grad():  # one class for every input: right on about half, as chance is
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))
    at_chance = independent_accuracy(model, x, y)
    assert abs(at_chance - 0.5) < 0.1
    for given in ({"reference_x": x, "reference_y": y}, {"reference_accuracy": at_chance}):
        with pytest.raises(InputError, match=r"^the model scores 0\.\d+ on the reference, no better than chance \(0\.500 for 2 classes\)"):
            retrain_to_cutoff(model, x, y, tolerance=0.05, max_steps=2, track_energy=False, **given)
    # A target the caller sets is theirs: the run goes ahead.
    result = retrain_to_cutoff(model, x, y, target_accuracy=0.9, max_steps=2, track_energy=False)
    assert result.steps == 2 and result.status == "cap_reached"


def test_result_round_trips_through_json() -> None:
    x, y, w = separable(n=100)
    result = retrain_to_cutoff(wrong_linear(w), x, y, target_accuracy=0.8, max_steps=6, eval_every=2, batch_size=16, **FAST)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert "model" not in data and data["status"] == result.status
    again = RetrainResult.from_dict(data)
    assert again.to_dict() == result.to_dict()


def test_cli_retrain_writes_the_model_and_reports_json(tmp_path) -> None:
    from typer.testing import CliRunner

    from shiftcost.cli import app
    from shiftcost.data.batches import Batch, save_batch
    from shiftcost.data.models import build_model, load_model, save_model

    torch.manual_seed(0)
    model, spec = build_model("digits_cnn", 3, in_channels=1, image_size=8)
    save_model(model, spec, tmp_path / "m.safetensors")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 8, 8, generator=g)
    save_batch(Batch(x=x, y=torch.randint(0, 3, (60,), generator=g), source="b"), tmp_path / "b.npz")
    save_batch(Batch(x=x, y=None, source="u"), tmp_path / "u.npz")
    runner = CliRunner()
    args = ["retrain", "-m", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "new.safetensors"), "--target-accuracy", "1.0", "--max-steps", "3", "--batch-size", "16", "--device", "cpu", "--json"]
    done = runner.invoke(app, [*args, "-b", str(tmp_path / "b.npz")])
    assert done.exit_code == 3, done.output  # random labels: the cap ends the run
    report = json.loads(done.stdout)
    assert report["status"] == "cap_reached" and report["steps"] == 3 and report["energy"]["energy_kwh"] > 0
    new_model, new_spec = load_model(tmp_path / "new.safetensors")
    assert new_spec == spec
    assert any(not torch.equal(a, b) for a, b in zip(new_model.state_dict().values(), model.state_dict().values()))

    refused = runner.invoke(app, [*args, "-b", str(tmp_path / "u.npz")])
    assert isinstance(refused.exception, InputError) and "needs labels" in str(refused.exception)
    (tmp_path / "m.safetensors").unlink()
    (tmp_path / "b.npz").unlink()
    (tmp_path / "u.npz").unlink()
    (tmp_path / "new.safetensors").unlink()
