"""The retraining recipe: its settings, its parts, and a default that does no harm to a converged model."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from shiftcost.errors import ConfigError, InputError
from shiftcost.recipe import Recipe, RetrainConfig
from shiftcost.retrain import retrain_to_cutoff
from tests.model import story


def separable(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def wrong(seed: int = 0) -> nn.Linear:
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0], model.weight[1, 0] = 1.0, -1.0  # predicts the opposite class
        model.bias.zero_()
    return model


def test_flat_names_reach_their_group_and_bad_values_are_one_sentence(tmp_path) -> None:
    config = RetrainConfig().replace(lr=0.1, tolerance=0.05, max_steps=7, track_energy=False, seed=3)
    assert (config.recipe.lr, config.cutoff.tolerance, config.caps.max_steps, config.energy.track, config.seed) == (0.1, 0.05, 7, False, 3)
    with pytest.raises(ConfigError, match="not a retraining setting"):
        RetrainConfig().replace(learning_rate=0.1)
    with pytest.raises(ConfigError, match="schedule 'linear' is unknown"):
        Recipe(schedule="linear")
    with pytest.raises(ConfigError, match="not a torchvision.transforms.v2 transform"):
        retrain_to_cutoff(wrong(), *separable(), target_accuracy=0.9, augment=("RandomFlop",), track_energy=False)
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text('[recipe]\noptimizer = "sgd"\nlr = 0.05\nschedule = "cosine"\naugment = ["RandomHorizontalFlip(p=1.0)"]\n[caps]\nmax_epochs = 3\n')
    from_file = RetrainConfig(cutoff=RetrainConfig().cutoff.__class__(tolerance=0.2)).with_file(recipe_file)
    assert from_file.recipe.optimizer == "sgd" and from_file.recipe.augment == ("RandomHorizontalFlip(p=1.0)",)
    assert from_file.caps.max_epochs == 3 and from_file.cutoff.tolerance == 0.2  # what the file does not name is kept
    assert RetrainConfig.from_dict(from_file.to_dict()) == from_file
    recipe_file.write_text("[recipe]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown setting recipe.learning_rate"):
        RetrainConfig.from_toml(recipe_file)


def test_cosine_schedule_anneals_to_zero_at_the_step_cap_and_step_decays_every_n_epochs() -> None:
    from shiftcost.retrain import _make_schedule

    steps_per_epoch, cap = 5, 8
    # The rules written out independently: cosine from 0.2 to 0 over the cap; halve every 0.6 epoch = 3 steps.
    cosine = [0.2 * (1 + math.cos(math.pi * s / cap)) / 2 for s in range(cap + 1)]
    step = [0.2 * 0.5 ** (s // 3) for s in range(cap + 1)]
    for schedule, expected in (("cosine", cosine), ("step", step)):
        recipe = Recipe(optimizer="sgd", lr=0.2, schedule=schedule, step_epochs=0.6, gamma=0.5)
        optim = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
        sched = _make_schedule(recipe, optim, cap, steps_per_epoch)
        got = [optim.param_groups[0]["lr"]]
        for _ in range(cap):
            optim.step()
            sched.step()
            got.append(optim.param_groups[0]["lr"])
        assert got == pytest.approx(expected, abs=1e-9)
    assert _make_schedule(Recipe(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), cap, steps_per_epoch) is None
    x, y = separable()
    result = retrain_to_cutoff(wrong(), x, y, target_accuracy=1.0, max_steps=cap, batch_size=32, lr=0.2, optimizer="sgd", schedule="cosine", track_energy=False)
    assert result.recipe["schedule"] == "cosine" and result.steps == cap


def test_a_train_step_entry_point_runs_inside_the_cutoff_protocol() -> None:
    x, y = separable()
    importlib_calls = __import__("importlib").import_module("tests.model.story").STEP_CALLS
    importlib_calls["count"] = 0
    result = retrain_to_cutoff(
        wrong(), x, y, target_accuracy=0.9, max_steps=40, batch_size=32, eval_every=2, lr=0.5, optimizer="sgd",
        train_step="tests.model.story:smoothed_step", track_energy=False,
    )  # fmt: skip
    assert result.status == "reached" and result.steps > 0 and result.recipe["train_step"] == "tests.model.story:smoothed_step"
    assert importlib_calls["count"] == result.steps
    with pytest.raises(InputError, match="does not import"):
        retrain_to_cutoff(wrong(), x, y, target_accuracy=0.9, train_step="tests.model.nowhere:step", track_energy=False)


def test_a_progress_callback_can_stop_the_run_and_the_cost_so_far_is_kept() -> None:
    x, y = separable()
    points = []

    def guard(point, step_cap, target):  # noqa: ANN001
        points.append(point.step)
        return "the budget would be exceeded" if point.step >= 4 else None

    result = retrain_to_cutoff(wrong(), x, y, target_accuracy=1.0, max_steps=50, batch_size=16, eval_every=2, lr=1e-4, track_energy=False, progress=guard)
    assert result.status == "stopped" and result.stop_reason == "the budget would be exceeded"
    assert result.steps == 4 and points == [0, 2, 4] and not result.reached_cutoff


@pytest.fixture(scope="module")
def converged():
    """A torchvision resnet18 (behind the usual Normalize) trained to convergence on 96 synthetic 32x32 images."""
    from torchvision.transforms import v2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = story.stripes(96, 0)
    torch.manual_seed(0)
    net = nn.Sequential(v2.Normalize(story.IMAGENET_MEAN, story.IMAGENET_STD), torchvision.models.resnet18(num_classes=4))
    model = story.train(net, x, y, epochs=10, lr=0.01)
    yield model, x, y
    torch.set_num_threads(threads)


def test_the_default_recipe_keeps_a_converged_model_on_its_reference_data(converged) -> None:
    from shiftcost.shifts import corrupt

    model, x_ref, y_ref = converged
    before = story.accuracy(model, x_ref, y_ref)
    assert before >= 0.95  # converged
    x_new, y_new = story.stripes(96, 1)
    shifted = corrupt(x_new, "contrast", 0.7, seed=0)
    assert story.accuracy(model, shifted, y_new) < before - 0.1  # the shift hurts: there is something to retrain for
    result = retrain_to_cutoff(
        model, shifted, y_new, reference_x=x_ref, reference_y=y_ref, max_epochs=6, batch_size=16, device="cpu", track_energy=False
    )
    assert result.reached_cutoff and result.steps > 0 and result.replay_samples > 0
    # Not worse on its reference data (one image of 96 is 0.0104).
    assert story.accuracy(result.model, x_ref, y_ref) >= before - 0.011
