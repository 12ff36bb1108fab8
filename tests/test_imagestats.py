"""Per-image statistics against a slow per-image loop, on known images, and under batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftcost.errors import InputError
from shiftcost.imagestats import IMAGE_STAT_NAMES, image_stats, stats_table

# --------------------------------------------------------------------- slow reference


def _slow_luma(image: np.ndarray) -> np.ndarray:
    """Luma of one C x H x W image, pixel by pixel."""
    channels, height, width = image.shape
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            if channels == 1:
                out[y, x] = image[0, y, x]
            elif channels == 3:
                out[y, x] = 0.299 * image[0, y, x] + 0.587 * image[1, y, x] + 0.114 * image[2, y, x]
            else:
                out[y, x] = math.fsum(image[c, y, x] for c in range(channels)) / channels
    return out


def _slow_filter(gray: np.ndarray, kernel: list[list[float]]) -> list[float]:
    """3x3 correlation over the valid region, as a flat list."""
    height, width = gray.shape
    values = []
    for y in range(1, height - 1):
        for x in range(1, width - 1):
            values.append(math.fsum(kernel[dy + 1][dx + 1] * gray[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)))
    return values


def _slow_stats(image: np.ndarray) -> dict[str, float]:
    gray = _slow_luma(image)
    pixels = gray.ravel().tolist()
    mean = math.fsum(pixels) / len(pixels)
    std = math.sqrt(math.fsum((p - mean) ** 2 for p in pixels) / len(pixels))
    lap = _slow_filter(gray, [[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    lap_mean = math.fsum(lap) / len(lap)
    sharpness = math.fsum((v - lap_mean) ** 2 for v in lap) / len(lap)
    imm = _slow_filter(gray, [[1, -2, 1], [-2, 4, -2], [1, -2, 1]])
    height, width = gray.shape
    noise = math.sqrt(math.pi / 2) / (6 * (width - 2) * (height - 2)) * math.fsum(abs(v) for v in imm)
    return {"brightness": mean, "contrast": std, "sharpness": sharpness, "noise": noise}


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("channels", [1, 3, 2])
def test_matches_slow_per_image_loop(channels: int) -> None:
    rng = np.random.default_rng(channels)
    batch = rng.random((5, channels, 9, 7))
    fast = stats_table(image_stats(torch.from_numpy(batch)))
    for i in range(batch.shape[0]):
        slow = _slow_stats(batch[i])
        for name in IMAGE_STAT_NAMES:
            assert fast[name][i] == pytest.approx(slow[name], abs=1e-6, rel=1e-6), (name, i)


def test_constant_image_has_no_contrast_sharpness_or_noise() -> None:
    batch = torch.full((3, 3, 8, 8), 0.4, dtype=torch.float64)
    stats = image_stats(batch)
    assert torch.allclose(stats["brightness"], torch.full((3,), 0.4, dtype=torch.float64))
    for name in ("contrast", "sharpness", "noise"):
        assert torch.all(stats[name].abs() < 1e-12), name


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_noise_estimate_recovers_gaussian_sigma(sigma: float) -> None:
    generator = torch.Generator().manual_seed(7)
    # A smooth ramp plus noise: Immerkaer's kernel cancels the ramp, so only the noise is measured.
    ramp = torch.linspace(0.3, 0.7, 64, dtype=torch.float64).view(1, 1, 1, 64).expand(4, 1, 64, 64)
    noisy = ramp + sigma * torch.randn(4, 1, 64, 64, generator=generator, dtype=torch.float64)
    estimate = image_stats(noisy)["noise"]
    assert torch.allclose(estimate, torch.full_like(estimate, sigma), rtol=0.05)
    assert image_stats(ramp.contiguous())["noise"].abs().max() < 1e-12


def test_blur_lowers_sharpness_and_noise_raises_it() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(6, 1, 16, 16, generator=generator)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    noisy = (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    base = image_stats(images)["sharpness"]
    assert torch.all(image_stats(blurred)["sharpness"] < base)
    assert image_stats(noisy)["noise"].mean() > image_stats(images)["noise"].mean()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), split=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_batching_and_order_do_not_change_any_image_value(n: int, split: int, seed: int) -> None:
    split = min(split, n - 1)
    rng = np.random.default_rng(seed)
    batch = torch.from_numpy(rng.random((n, 3, 6, 5)))
    whole = image_stats(batch)
    parts = [image_stats(batch[:split]), image_stats(batch[split:])]
    order = torch.from_numpy(rng.permutation(n))
    permuted = image_stats(batch[order])
    for name in IMAGE_STAT_NAMES:
        assert torch.allclose(torch.cat([p[name] for p in parts]), whole[name], rtol=1e-12, atol=1e-15)
        assert torch.allclose(permuted[name], whole[name][order], rtol=1e-12, atol=1e-15)


def test_keeps_dtype_and_does_not_modify_the_batch() -> None:
    batch = torch.rand(2, 3, 5, 5)
    copy = batch.clone()
    stats = image_stats(batch)
    assert torch.equal(batch, copy)
    assert all(v.dtype == torch.float32 and v.shape == (2,) for v in stats.values())
    table = stats_table(stats)
    assert list(table) == list(IMAGE_STAT_NAMES) and all(v.dtype == np.float64 for v in table.values())


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.rand(3, 8, 8), "N x C x H x W"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "floating-point"),
        (torch.rand(0, 1, 8, 8), "empty batch"),
        (torch.rand(2, 1, 2, 8), "3 x 3"),
        (np.zeros((2, 1, 8, 8)), "torch tensor"),
    ],
)
def test_bad_batches_are_refused_with_one_clear_sentence(bad, words: str) -> None:
    with pytest.raises(InputError, match=words):
        image_stats(bad)
