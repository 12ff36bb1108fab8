"""The digits demo data, its splits and the demo base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

from shiftcost.data.demo import (
    DIGITS_IMAGE_SIZE,
    SPLIT_NAMES,
    accuracy,
    load_digits,
    split_digits,
    train_classifier,
    train_demo_model,
)
from shiftcost.data.models import build_model, model_fingerprint
from shiftcost.errors import InputError
from shiftcost.shifts import DEFAULT_SWEEP, corrupt


@pytest.fixture(scope="module")
def demo():
    return train_demo_model(seed=0)


def test_digits_at_native_size_are_the_sklearn_images_scaled_to_unit_range():
    x, y = load_digits(image_size=8)
    reference = sklearn_digits()
    assert torch.equal(x, torch.from_numpy((reference.images / 16.0).astype(np.float32)).unsqueeze(1))
    assert torch.equal(y, torch.from_numpy(reference.target).long())


def test_upsampled_digits_have_the_demo_shape_and_range():
    x, y = load_digits()
    assert x.shape == (1797, 1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    # Bilinear upsampling preserves each image's mean brightness up to border effects.
    small, _ = load_digits(image_size=8)
    assert torch.allclose(x.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=0.02)


def test_splits_partition_the_data_stratified_and_seeded():
    x, y = load_digits()
    x = x + torch.arange(len(x)).view(-1, 1, 1, 1) * 10  # tag every image with its index
    splits = split_digits(x, y, seed=3)
    assert tuple(splits) == SPLIT_NAMES
    indices = {name: set((part[0][:, 0, 0, 0] // 10).round().long().tolist()) for name, part in splits.items()}
    assert sum(len(v) for v in indices.values()) == len(y)
    assert set().union(*indices.values()) == set(range(len(y)))
    for name, share in zip(SPLIT_NAMES, (0.5, 0.2, 0.3)):
        part_y = splits[name][1]
        assert abs(len(part_y) - share * len(y)) <= 2
        counts = torch.bincount(part_y, minlength=10).double()
        overall = torch.bincount(y, minlength=10).double()
        assert torch.all((counts - share * overall).abs() <= 2)  # stratified: each class keeps its share
    again = split_digits(x, y, seed=3)
    other = split_digits(x, y, seed=4)
    assert torch.equal(again["holdout"][0], splits["holdout"][0])
    assert not torch.equal(other["holdout"][0], splits["holdout"][0])


def test_bad_fractions_are_refused():
    x, y = load_digits(image_size=8)
    with pytest.raises(InputError, match="fractions"):
        split_digits(x, y, fractions=(0.5, 0.5, 0.5))


def test_demo_model_beats_ninety_percent_on_holdout(demo):
    model, spec, splits = demo
    assert spec.architecture == "digits_cnn" and spec.input_shape == (1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    assert not model.training
    assert accuracy(model, *splits["holdout"]) > 0.9
    assert accuracy(model, *splits["stream"]) > 0.9


def test_training_is_seeded_and_leaves_the_global_random_state_alone():
    x, y = load_digits()
    x, y = x[:200], y[:200]

    def trained(seed: int) -> str:
        torch.manual_seed(0)
        model, _ = build_model("digits_cnn", 10)
        state = torch.random.get_rng_state()
        train_classifier(model, x, y, epochs=1, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)
        return model_fingerprint(model)

    first = trained(1)
    assert trained(1) == first
    assert trained(2) != first


def test_demo_model_is_reproducible_without_touching_the_global_generator(demo):
    state = torch.random.get_rng_state()
    model, spec, splits = train_demo_model(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model_fingerprint(model) == model_fingerprint(demo[0]) and spec == demo[1]
    assert all(torch.equal(splits[name][0], demo[2][name][0]) for name in SPLIT_NAMES)


def test_training_refuses_mismatched_data():
    model, _ = build_model("digits_cnn", 10)
    with pytest.raises(InputError, match="labels"):
        train_classifier(model, torch.rand(4, 1, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="schedule"):
        train_classifier(model, torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), schedule="warm")


def test_default_sweep_hurts_the_demo_model_without_destroying_the_digits(demo):
    model, _, splits = demo
    x, y = splits["holdout"]
    clean = accuracy(model, x, y)
    for kind in ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast"):
        strongest = accuracy(model, corrupt(x, kind, DEFAULT_SWEEP[kind][-1], seed=1), y)
        # Visibly hurt (at least 0.25 lost) but above chance (0.1, give or take 0.016 on
        # 359 holdout images): the corrupted digits still carry their class.
        assert clean - strongest >= 0.25, (kind, clean, strongest)
        assert strongest >= 0.13, (kind, strongest)
