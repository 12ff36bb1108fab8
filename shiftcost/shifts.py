"""Seeded image corruptions for calibration sweeps: known shifts at known strengths.

Every corruption takes a whole batch tensor N x C x H x W of images in [0, 1] and an
intensity, and is vectorised over the batch. Conventions shared by all kinds:

* intensity 0 returns an exact copy of ``x``; a larger intensity is a stronger shift;
* the same ``seed`` gives the same output; random draws are made on the CPU from a
  ``torch.Generator`` and then moved, so the output does not depend on ``x``'s device;
* outputs are clamped to [0, 1] except for ``gaussian_noise``, which the papers apply
  unclamped (pass ``clamp=True`` for the clamped variant, or ``clamp=False`` to skip
  clamping elsewhere).

Kinds and what their intensity means:

=================  ===========================================================  ==========
kind               intensity                                                    range
=================  ===========================================================  ==========
gaussian_noise     sigma of additive N(0, 1) noise: x + sigma * z              >= 0
shot_noise         noise std at full brightness: Poisson(x / s^2) * s^2         >= 0
impulse_noise      fraction p of pixels set to 0 or 1 (salt and pepper)         0 .. 1
gaussian_blur      sigma of the Gaussian kernel in pixels (torchvision)         >= 0
contrast           c: x -> m + (1 - c)(x - m), m the image mean; 1 = flat grey  0 .. 1
brightness         b added to every pixel                                       0 .. 1
frost              t: (1 - 0.4 t) x + 0.75 t F, F a plasma-fractal ice layer    0 .. 1
elastic            largest displacement of a smooth random warp, share of side  0 .. 1
perspective        largest inward move of each corner, share of the half side   0 .. 1
=================  ===========================================================  ==========

The last two move pixels rather than change them, so calibration sees shifts that the
model must relearn as shapes, not only as intensities.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from shiftcost.errors import InputError

Corruption = Callable[..., torch.Tensor]


def _gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return x + sigma * _randn_like(x, generator)


def _shot_noise(x: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    # Photon counts with mean x / scale^2, so the std at brightness x is scale * sqrt(x).
    rates = x.detach().to("cpu", torch.float64).clamp(min=0.0) / scale**2
    counts = torch.poisson(rates, generator=generator)
    return (counts * scale**2).to(x.device, x.dtype)


def _impulse_noise(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    # One draw per pixel location: a hit pixel turns black or white in every channel.
    hit = _rand((n, 1, h, w), generator, x) < fraction
    salt = (_rand((n, 1, h, w), generator, x) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def _gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    # Below sigma 0.1 a neighbour's weight, exp(-1 / (2 sigma^2)) < 2e-22, vanishes in
    # float32: the blur is the identity (and a tiny sigma would make the kernel 0 / 0).
    if sigma < 0.1:
        return x.clone()
    # Three sigmas each side, but reflect padding needs the kernel to fit the image.
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(x.shape[-2:]) - 1)
    size = size if size % 2 else size - 1
    if size < 3:
        return x.clone()
    return TF.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def _contrast(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (1.0 - strength) * (x - mean)


def _brightness(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    return x + amount


def _frost(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    ice = plasma_fractal(n, h, w, generator=generator).to(x.device, x.dtype)
    return (1.0 - 0.4 * strength) * x + 0.75 * strength * ice


def _elastic(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    return _warp(x, _identity_grid(n, h, w) + elastic_displacement(n, h, w, strength, generator=generator))


def _perspective(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    homography = perspective_homography(n, strength, generator=generator)
    points = torch.cat([_identity_grid(n, h, w), torch.ones(n, h, w, 1)], -1) @ homography.transpose(1, 2)[:, None]
    return _warp(x, points[..., :2] / points[..., 2:])


def elastic_displacement(n: int, height: int, width: int, strength: float, *, generator: torch.Generator) -> torch.Tensor:
    """``n`` smooth random displacement fields (N x H x W x 2, in ``grid_sample`` units).

    White noise smoothed to features about a quarter of the side wide, as torchvision's
    ElasticTransform draws it, but one field per image and scaled so its largest move is
    ``strength`` of the side (a side spans 2 grid units).
    """
    from torchvision.transforms.v2 import functional as TF

    noise = torch.rand((n, 2, height, width), generator=generator) * 2.0 - 1.0
    sigma = max(height, width) / 8.0
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(height, width) - 1) | 1
    field = TF.gaussian_blur(noise, kernel_size=[size, size], sigma=[sigma, sigma]) if size >= 3 else noise
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    return (2.0 * strength * field).permute(0, 2, 3, 1)


def perspective_homography(n: int, strength: float, *, generator: torch.Generator) -> torch.Tensor:
    """``n`` homographies (N x 3 x 3) from output to input ``grid_sample`` coordinates.

    Each output corner (+-1, +-1) samples the input at that corner moved inward by up to
    ``strength`` of the half side along each axis: torchvision's RandomPerspective, with
    one draw per image.
    """
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    moved = corners - corners.sign() * strength * torch.rand((n, 4, 2), generator=generator)
    u, v = corners[:, 0].expand(n, 4), corners[:, 1].expand(n, 4)
    px, py = moved[..., 0], moved[..., 1]
    one, zero = torch.ones_like(px), torch.zeros_like(px)
    # p = (a u + b v + c) / (g u + h v + 1), q likewise: eight linear equations per image.
    rows_x = torch.stack([u, v, one, zero, zero, zero, -u * px, -v * px], dim=-1)
    rows_y = torch.stack([zero, zero, zero, u, v, one, -u * py, -v * py], dim=-1)
    coef = torch.linalg.solve(torch.cat([rows_x, rows_y], 1).double(), torch.cat([px, py], 1).double()).float()
    return torch.cat([coef, torch.ones(n, 1)], 1).view(n, 3, 3)


def _identity_grid(n: int, h: int, w: int) -> torch.Tensor:
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
    return F.affine_grid(theta, [n, 1, h, w], align_corners=False)


def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # Border padding: what a warp pulls in from outside the image is its edge, not a new black frame.
    return F.grid_sample(x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def plasma_fractal(n: int, height: int, width: int, *, generator: torch.Generator, roughness: float = 1.0) -> torch.Tensor:
    """``n`` seeded plasma-fractal textures (N x 1 x H x W, each min-max scaled to [0, 1]).

    Spectral synthesis: white noise shaped to a 1 / f^(1 + roughness) amplitude
    spectrum, the statistics of the midpoint-displacement "plasma" used for fog and
    frost, without its grid artefacts. Made on the CPU, so it is device independent.
    """
    noise = torch.randn((n, 1, height, width), generator=generator, dtype=torch.float32)
    spectrum = torch.fft.rfft2(noise)
    fy = torch.fft.fftfreq(height).abs().unsqueeze(1)
    fx = torch.fft.rfftfreq(width).unsqueeze(0)
    radius = torch.sqrt(fy**2 + fx**2)
    radius[0, 0] = 1.0  # the mean is removed below; avoid dividing by zero
    amplitude = radius ** -(1.0 + roughness)
    amplitude[0, 0] = 0.0
    field = torch.fft.irfft2(spectrum * amplitude, s=(height, width))
    low = field.amin(dim=(2, 3), keepdim=True)
    high = field.amax(dim=(2, 3), keepdim=True)
    return (field - low) / (high - low).clamp(min=1e-12)


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float32).to(like.device)


@dataclass(frozen=True)
class _Kind:
    apply: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    clamp: bool
    maximum: float | None = None


_KINDS: dict[str, _Kind] = {
    "gaussian_noise": _Kind(_gaussian_noise, clamp=False),
    "shot_noise": _Kind(_shot_noise, clamp=True),
    "impulse_noise": _Kind(_impulse_noise, clamp=True, maximum=1.0),
    "gaussian_blur": _Kind(_gaussian_blur, clamp=True),
    "contrast": _Kind(_contrast, clamp=True, maximum=1.0),
    "brightness": _Kind(_brightness, clamp=True, maximum=1.0),
    "frost": _Kind(_frost, clamp=True, maximum=1.0),
    "elastic": _Kind(_elastic, clamp=True, maximum=1.0),
    "perspective": _Kind(_perspective, clamp=True, maximum=1.0),
}


def _run(kind: str, x: torch.Tensor, intensity: float, *, seed: int = 0, clamp: bool | None = None) -> torch.Tensor:
    definition = _KINDS[kind]
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{kind} needs a float image batch of shape N x C x H x W, got {shape}.")
    try:
        intensity = float(intensity)
    except (TypeError, ValueError):
        raise InputError(f"{kind} intensity must be a number, got {intensity!r}.") from None
    if not math.isfinite(intensity) or intensity < 0 or (definition.maximum is not None and intensity > definition.maximum):
        upper = "" if definition.maximum is None else f" and at most {definition.maximum:g}"
        raise InputError(f"{kind} intensity must be at least 0{upper}, got {intensity!r}.")
    if intensity == 0.0 or x.shape[0] == 0:
        return x.clone()
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out = definition.apply(x, intensity, generator)
    if definition.clamp if clamp is None else clamp:
        out = out.clamp(0.0, 1.0)
    return out


def _public(kind: str) -> Corruption:
    function = partial(_run, kind)
    function.__name__ = kind  # type: ignore[attr-defined]
    function.__doc__ = f"Apply {kind} to a batch: ``{kind}(x, intensity, *, seed=0, clamp=None) -> Tensor``."
    return function


#: kind -> function(x, intensity, *, seed=0, clamp=None) -> Tensor
CORRUPTIONS: dict[str, Corruption] = {kind: _public(kind) for kind in _KINDS}

#: Intensities for calibration sweeps, 0 (no shift) first. Chosen on the digits demo:
#: the strongest level of each kind takes the demo model from about 0.97 holdout
#: accuracy down to 0.2-0.5, while the digits stay recognisable to the eye; the steps
#: in between spread the accuracy loss roughly evenly. The two geometric kinds are far
#: harder to relearn at the same accuracy loss (from elastic 0.13 or perspective 0.35 the
#: demo model's retrain hits the 15-epoch cap), so their levels run from mild (demo
#: accuracy 0.95) to just past that edge (0.82 and 0.76), where a cost model learns most.
DEFAULT_SWEEP: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.0, 0.04, 0.08, 0.12, 0.16, 0.2),
    "shot_noise": (0.0, 0.1, 0.15, 0.2, 0.25, 0.3),
    "impulse_noise": (0.0, 0.02, 0.04, 0.06, 0.08, 0.1),
    "gaussian_blur": (0.0, 0.5, 0.75, 1.0, 1.25, 1.5),
    "contrast": (0.0, 0.08, 0.16, 0.24, 0.32, 0.4),
    "brightness": (0.0, 0.05, 0.1, 0.15, 0.2, 0.25),
    "frost": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "elastic": (0.0, 0.07, 0.09, 0.11, 0.13, 0.15),
    "perspective": (0.0, 0.2, 0.25, 0.3, 0.35, 0.4),
}


#: The share of its above-chance accuracy that the digits demo CNN loses at each kind's
#: strongest default intensity (the mean over demo seeds 0 and 1, rounded to 0.05).
#: Fitting the sweep to another model (:func:`shiftcost.calibrate.fit_sweep`) stretches each
#: kind's intensities until that model loses the same share, so the ladder keeps the shape
#: it was chosen for: mild to strong for most kinds, and just past the edge of the 15-epoch
#: cap for the two geometric ones.
DEFAULT_TOP_DROP: dict[str, float] = {
    "gaussian_noise": 0.75,
    "shot_noise": 0.55,
    "impulse_noise": 0.65,
    "gaussian_blur": 0.7,
    "contrast": 0.8,
    "brightness": 0.7,
    "frost": 0.6,
    "elastic": 0.15,
    "perspective": 0.2,
}


def max_intensity(kind: str) -> float | None:
    """The largest intensity ``kind`` accepts (None: no upper bound)."""
    if kind not in _KINDS:
        raise InputError(f"Unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}.")
    return _KINDS[kind].maximum


def corrupt(x: torch.Tensor, kind: str, intensity: float, *, seed: int = 0, clamp: bool | None = None) -> torch.Tensor:
    """Apply corruption ``kind`` at ``intensity`` to the batch ``x`` (a new tensor).

    ``clamp=None`` uses the kind's default (see the module docs). Unknown kinds and
    out-of-range intensities raise :class:`InputError`.
    """
    if kind not in CORRUPTIONS:
        close = difflib.get_close_matches(str(kind), list(CORRUPTIONS), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"Unknown corruption {kind!r}{hint}; choose one of {', '.join(CORRUPTIONS)}.")
    return CORRUPTIONS[kind](x, intensity, seed=seed, clamp=clamp)
