"""Corruptions: identity at zero, seeding, monotone strength, clamping, and the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from shiftcost.data.demo import load_digits
from shiftcost.errors import InputError
from shiftcost.shifts import CORRUPTIONS, DEFAULT_SWEEP, corrupt, elastic_displacement, perspective_homography, plasma_fractal

KINDS = tuple(CORRUPTIONS)
RANDOM_KINDS = ("gaussian_noise", "shot_noise", "impulse_noise", "frost", "elastic", "perspective")
SWEPT = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits()[0][:128]


def _strongest(kind: str) -> float:
    return DEFAULT_SWEEP[kind][-1]


def _mean_change(x: torch.Tensor, kind: str, intensity: float, seed: int = 0) -> float:
    return float((corrupt(x, kind, intensity, seed=seed) - x).abs().mean())


def test_every_spec_kind_is_offered():
    assert set(KINDS) == {
        "gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness", "frost", "elastic", "perspective",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_intensity_zero_returns_an_identical_copy(digits, kind):
    x = digits.clone()
    x[0, 0, 0, 0] = 1.5  # even values outside [0, 1] pass through untouched
    for clamp in (None, True, False):
        out = corrupt(x, kind, 0.0, seed=5, clamp=clamp)
        assert torch.equal(out, x) and out is not x


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_output_and_input_untouched(digits, kind):
    before = digits.clone()
    a = corrupt(digits, kind, _strongest(kind), seed=7)
    b = corrupt(digits, kind, _strongest(kind), seed=7)
    assert torch.equal(a, b)
    assert torch.equal(digits, before)
    assert a.shape == digits.shape and a.dtype == digits.dtype
    if kind in RANDOM_KINDS:
        assert not torch.equal(a, corrupt(digits, kind, _strongest(kind), seed=8))


@pytest.mark.parametrize("kind", KINDS)
def test_strength_grows_along_the_default_sweep(digits, kind):
    levels = DEFAULT_SWEEP[kind]
    changes = [_mean_change(digits, kind, level) for level in levels]
    assert changes[0] == 0.0
    assert all(b >= a for a, b in zip(changes, changes[1:])), changes
    assert changes[-1] > 0.01


# Kinds whose draws do not depend on the intensity: the same seed couples every level,
# so the change must grow with the intensity for every pair, not only on the sweep grid.
@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(("gaussian_noise", "impulse_noise", "contrast", "brightness", "frost", "gaussian_blur")),
    a=st.floats(0.0, 1.0),
    b=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    clamp=st.sampled_from((None, True)),
)
def test_strength_is_monotone_for_any_pair_of_intensities(kind, a, b, seed, clamp):
    x = load_digits(image_size=8)[0][:16]
    low, high = sorted((a, b))
    change = [float((corrupt(x, kind, t, seed=seed, clamp=clamp) - x).abs().mean()) for t in (low, high)]
    assert change[1] >= change[0] - 1e-6


def test_gaussian_noise_is_unclamped_by_default_and_clamped_on_request(digits):
    sigma = 0.3
    raw = corrupt(digits, "gaussian_noise", sigma, seed=3)
    expected = digits + sigma * torch.randn(digits.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(raw, expected, atol=1e-6)
    assert float(raw.min()) < 0.0 and float(raw.max()) > 1.0
    clamped = corrupt(digits, "gaussian_noise", sigma, seed=3, clamp=True)
    assert torch.equal(clamped, raw.clamp(0, 1))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "gaussian_noise"])
def test_other_kinds_stay_in_the_unit_range(digits, kind):
    top = 1.0 if kind in ("impulse_noise", "contrast", "brightness", "frost", "elastic", "perspective") else 3.0
    out = corrupt(digits, kind, top, seed=1)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_clamp_false_leaves_brightness_above_one(digits):
    assert float(corrupt(digits, "brightness", 0.5, clamp=False).max()) > 1.0


def test_shot_noise_is_poisson_with_the_documented_scale():
    scale, level = 0.1, 0.25
    x = torch.full((64, 1, 32, 32), level)
    out = corrupt(x, "shot_noise", scale, seed=2, clamp=False)
    counts = out / scale**2  # Poisson(level / scale^2) = Poisson(25)
    assert torch.allclose(counts, counts.round(), atol=1e-3)
    assert float(counts.mean()) == pytest.approx(25, rel=0.01)
    assert float(counts.var()) == pytest.approx(25, rel=0.05)
    assert torch.equal(corrupt(torch.zeros(2, 1, 4, 4), "shot_noise", 0.5), torch.zeros(2, 1, 4, 4))


def test_impulse_noise_hits_the_given_fraction_of_pixels_in_all_channels():
    x = torch.full((32, 3, 32, 32), 0.5)
    out = corrupt(x, "impulse_noise", 0.2, seed=4)
    hit = out != 0.5
    assert torch.equal(hit.all(dim=1), hit.any(dim=1))  # a pixel is hit in every channel or none
    assert float(hit[:, 0].float().mean()) == pytest.approx(0.2, abs=0.01)
    assert set(out[hit].unique().tolist()) == {0.0, 1.0}
    assert float((out[hit] == 1.0).float().mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_gaussian_blur_matches_scipy(digits, sigma):
    out = corrupt(digits[:8], "gaussian_blur", sigma)
    # torch "reflect" padding is scipy's "mirror"; both truncate the kernel at three sigmas.
    reference = ndimage.gaussian_filter(digits[:8].numpy().astype(np.float64), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=3.0)
    assert np.allclose(out.numpy(), reference, atol=1e-5)


def test_contrast_moves_pixels_towards_the_image_mean(digits):
    x = digits[:4]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(corrupt(x, "contrast", 0.25), mean + 0.75 * (x - mean), atol=1e-6)
    flat = corrupt(x, "contrast", 1.0)
    assert torch.allclose(flat, mean.expand_as(x), atol=1e-6)


def test_brightness_adds_and_clamps(digits):
    assert torch.allclose(corrupt(digits, "brightness", 0.2), (digits + 0.2).clamp(0, 1))


def test_frost_blends_a_plasma_fractal(digits):
    out = corrupt(digits, "frost", 1.0, seed=9, clamp=False)
    n, _, h, w = digits.shape
    ice = plasma_fractal(n, h, w, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(out, 0.6 * digits + 0.75 * ice, atol=1e-6)


def test_plasma_fractal_is_a_seeded_low_frequency_texture():
    make = lambda seed: plasma_fractal(8, 64, 64, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    field = make(0)
    assert field.shape == (8, 1, 64, 64)
    assert torch.allclose(field.amin(dim=(2, 3)), torch.zeros(8, 1)) and torch.allclose(field.amax(dim=(2, 3)), torch.ones(8, 1))
    assert torch.equal(field, make(0)) and not torch.equal(field, make(1))
    assert not torch.allclose(field[0], field[1])  # every image gets its own texture
    power = torch.fft.rfft2(field - field.mean(dim=(2, 3), keepdim=True)).abs() ** 2
    low, high = power[..., 1:4, 1:4].mean(), power[..., 24:32, 24:32].mean()
    assert float(low) > 100 * float(high)  # a fractal, not white noise


def _sample_like_scipy(x: torch.Tensor, grid: torch.Tensor) -> np.ndarray:
    """Bilinear sampling at ``grid_sample`` coordinates (align_corners=False), edges extended: one image at a time."""
    n, c, h, w = x.shape
    cols = ((grid[..., 0].double() + 1) * w - 1) / 2
    rows = ((grid[..., 1].double() + 1) * h - 1) / 2
    out = np.empty((n, c, h, w))
    for i in range(n):
        for j in range(c):
            out[i, j] = ndimage.map_coordinates(x[i, j].double().numpy(), [rows[i].numpy(), cols[i].numpy()], order=1, mode="nearest")
    return out


def _identity(n: int, h: int, w: int) -> torch.Tensor:
    return torch.nn.functional.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, h, w], align_corners=False)


@pytest.mark.parametrize("strength", [0.07, 0.15, 0.5])
def test_elastic_warps_by_a_smooth_field_whose_largest_move_is_the_strength(digits, strength):
    x = digits[:6]
    n, _, h, w = x.shape
    field = elastic_displacement(n, h, w, strength, generator=torch.Generator().manual_seed(4))
    # A side spans two grid units, so the largest move is 2 x strength in every image.
    assert torch.allclose(field.abs().amax(dim=(1, 2, 3)), torch.full((n,), 2 * strength), atol=1e-6)
    assert not torch.allclose(field[0], field[1])
    step = (field[:, 1:] - field[:, :-1]).abs().mean() / field.abs().mean()
    assert float(step) < 0.3  # neighbouring pixels move together: a warp, not pixel noise
    expected = _sample_like_scipy(x, _identity(n, h, w) + field)
    assert np.allclose(corrupt(x, "elastic", strength, seed=4).numpy(), np.clip(expected, 0, 1), atol=1e-5)


@pytest.mark.parametrize("strength", [0.2, 0.4, 1.0])
def test_perspective_moves_each_corner_inward_and_keeps_lines_straight(digits, strength):
    x = digits[:6]
    n, _, h, w = x.shape
    homography = perspective_homography(n, strength, generator=torch.Generator().manual_seed(5)).double()

    def project(points: torch.Tensor) -> torch.Tensor:
        flat = points.reshape(n, -1, 2)
        mapped = torch.cat([flat, torch.ones(n, flat.shape[1], 1, dtype=flat.dtype)], -1) @ homography.transpose(1, 2)
        return (mapped[..., :2] / mapped[..., 2:]).reshape(points.shape)

    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64).expand(n, 4, 2)
    inward = 1 - project(corners) * corners.sign()  # how far each corner moved inward, in half sides
    assert float(inward.min()) >= -1e-6 and float(inward.max()) <= strength + 1e-6
    line = torch.stack([torch.linspace(-1, 1, 9, dtype=torch.float64), torch.linspace(-0.5, 0.8, 9, dtype=torch.float64)], -1).expand(n, 9, 2)
    mapped = project(line)
    along, across = mapped[:, -1] - mapped[:, 0], mapped - mapped[:, :1]
    assert float((along[:, None, 0] * across[..., 1] - along[:, None, 1] * across[..., 0]).abs().max()) < 1e-9
    grid = project(_identity(n, h, w).double())
    expected = _sample_like_scipy(x, grid)
    assert np.allclose(corrupt(x, "perspective", strength, seed=5).numpy(), np.clip(expected, 0, 1), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_output_does_not_depend_on_the_device(digits, kind, monkeypatch):
    # TF32 convolutions, cuDNN's default on Ampere and later, keep 10 mantissa bits: the blur
    # would differ by ~1e-3 for that alone. The property is about the corruption's arithmetic.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = corrupt(digits, kind, _strongest(kind), seed=3)
    gpu = corrupt(digits.cuda(), kind, _strongest(kind), seed=3).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)


def test_unknown_kind_lists_the_kinds_and_suggests_a_match(digits):
    with pytest.raises(InputError) as caught:
        corrupt(digits, "gaussian_nosie", 0.1)
    message = str(caught.value)
    assert "did you mean gaussian_noise" in message and all(kind in message for kind in KINDS)


@pytest.mark.parametrize(
    ("kind", "intensity"), [("gaussian_noise", -0.1), ("contrast", 1.5), ("impulse_noise", 2.0), ("gaussian_blur", float("nan"))]
)
def test_out_of_range_intensity_is_refused(digits, kind, intensity):
    with pytest.raises(InputError, match=kind):
        corrupt(digits, kind, intensity)


def test_non_batch_input_is_refused():
    with pytest.raises(InputError, match="N x C x H x W"):
        corrupt(torch.rand(16, 16), "contrast", 0.5)
    with pytest.raises(InputError, match="N x C x H x W"):
        corrupt(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "contrast", 0.5)


def test_default_sweep_levels_are_usable_and_increasing():
    for kind in SWEPT:
        assert len(DEFAULT_SWEEP[kind]) >= 5 and DEFAULT_SWEEP[kind][0] == 0.0
    for kind, levels in DEFAULT_SWEEP.items():
        assert kind in CORRUPTIONS
        assert list(levels) == sorted(set(levels))
        corrupt(torch.rand(1, 1, 4, 4), kind, levels[-1])
