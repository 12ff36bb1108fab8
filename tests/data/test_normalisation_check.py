"""The import's accuracy check tries the images' own per-channel mean/std beside the common normalisations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shiftcost.data import Batch
from shiftcost.data.importing import OWN_NORMALISATION, check_accuracy, own_normalisation
from shiftcost.data.models import ModelSpec, apply_preprocessing

CHANNEL_MEAN = (0.2, 0.55, 0.7)
CHANNEL_STD = (0.05, 0.1, 0.08)


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels around a mean of their own per channel (far from ImageNet's and from 0.5), and a
    class that is the sign of a fixed direction in normalised pixel space."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(CHANNEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CHANNEL_STD).view(1, 3, 1, 1)
    x = (mean + std * torch.randn(n, 3, 4, 4, generator=g)).clamp(0, 1)
    direction = torch.randn(3 * 4 * 4, generator=torch.Generator().manual_seed(99))
    y = (((x - mean) / std).flatten(1) @ direction > 0).long()
    return x, y


def trained_on_normalised(x: torch.Tensor, y: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """A linear classifier trained in plain PyTorch on ``(x - mean) / std``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    z = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(z), y).backward()
        optimizer.step()
    return model.eval()


def spec(mean=None, std=None) -> ModelSpec:
    return ModelSpec("factory:linear", 2, 3, 4, ("a", "b"), "1", mean=mean, std=std)


def test_the_own_mean_and_std_are_every_pixel_s_per_channel_to_four_digits() -> None:
    x, _ = images(200, 1)
    pixels = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    mean, std = own_normalisation(x)
    assert mean == pytest.approx(pixels.mean(axis=1), rel=5e-4) and std == pytest.approx(pixels.std(axis=1), rel=5e-4)
    assert all(len(f"{v:g}".lstrip("0.")) <= 4 for v in mean + std)


def test_a_channel_that_never_varies_is_divided_by_one() -> None:
    x = torch.rand(10, 3, 4, 4)
    x[:, 1] = 0.25
    mean, std = own_normalisation(x)
    assert mean[1] == 0.25 and std[1] == 1.0 and std[0] != 1.0


def test_a_model_trained_on_its_data_s_own_statistics_is_told_to_import_with_them() -> None:
    x, y = images(600, 2)
    own_mean, own_std = (tuple(round(value, 4) for value in v) for v in (x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3), correction=0).tolist()))
    model = trained_on_normalised(x, y, own_mean, own_std)
    raw = check_accuracy(model, spec(), Batch(x, y, "ref"))

    assert raw.alternatives[OWN_NORMALISATION] > max(v for k, v in raw.alternatives.items() if k != OWN_NORMALISATION) + 0.1
    assert raw.alternatives[OWN_NORMALISATION] >= raw.accuracy + 0.1
    mean, std = own_normalisation(x)
    flags = f"--mean {','.join(f'{v:g}' for v in mean)} --std {','.join(f'{v:g}' for v in std)}"
    assert f"with {OWN_NORMALISATION}: it was probably trained with that normalisation; import it again with {flags}" in raw.suggestion
    assert raw.suggestion.count(". ") == 0 and raw.suggestion.endswith("(or the exact figures it was trained with).")

    # Imported with the flags named, the model scores what the sentence promised and is told nothing more.
    fixed = apply_preprocessing(model, spec(mean, std))
    check = check_accuracy(fixed, spec(mean, std), Batch(x, y, "ref"))
    assert check.accuracy == pytest.approx(raw.alternatives[OWN_NORMALISATION]) and check.suggestion is None
