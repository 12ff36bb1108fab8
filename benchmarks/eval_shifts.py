"""Shift kinds for *evaluating* cost forecasts only.

None of these is in :mod:`shiftcost.shifts`, and nothing here may be used to calibrate a
cost model or to choose any setting: ``benchmarks/forecast_accuracy.py`` calibrates on the
built-in kinds and only then scores on these. Intensities were fixed before any forecast
was scored on them (mild, medium, strong by eye on the digits) and must not be tuned.
Every kind takes a batch N x C x H x W in [0, 1], an intensity and a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EVAL_KINDS: dict[str, tuple[float, ...]] = {
    "rotate": (10.0, 20.0, 30.0),  # degrees, random sign per image
    "translate": (0.07, 0.13, 0.19),  # shift as a share of the side, random direction per image
    "pixelate": (1.5, 2.0, 3.0),  # downsampling factor
    "invert_blend": (0.15, 0.3, 0.45),  # (1 - a) x + a (1 - x)
    "occlusion": (0.25, 0.375, 0.5),  # side of a black square as a share of the image side
    "gamma": (1.5, 2.5, 4.0),  # x ** gamma
    "speckle_noise": (0.3, 0.6, 0.9),  # x + s x N(0, 1)
    "motion_blur": (3.0, 5.0, 7.0),  # horizontal box kernel length in pixels
}

#: A second evaluation-only set, added after ``EVAL_KINDS`` had been scored several times, so a
#: design can be scored on kinds no earlier choice has seen. Intensities fixed before any
#: forecast was scored on them; the first of each triple is the mildest.
FRESH_KINDS: dict[str, tuple[float, ...]] = {
    "shear": (0.15, 0.3, 0.45),  # horizontal shear factor, random sign per image
    "zoom_out": (0.85, 0.75, 0.65),  # the image shrunk about its centre to this share of its side
    "squeeze": (0.85, 0.7, 0.55),  # the height shrunk to this share, the width kept
    "mirror": (0.2, 0.4, 0.6),  # share of images flipped left to right
    "posterize": (6.0, 4.0, 2.0),  # grey levels kept
    "sharpen": (1.0, 2.0, 3.0),  # unsharp-mask amount: x + a (x - box3(x))
}

#: A third evaluation-only set, added when geometric kinds (elastic, perspective) joined the
#: built-in calibration kinds: both earlier sets had been scored by then, so this one judges
#: that change on kinds no choice has seen. Intensities fixed before any forecast was scored
#: on them; the first of each triple is the mildest.
THIRD_KINDS: dict[str, tuple[float, ...]] = {
    "dilate": (0.33, 0.67, 1.0),  # blend a towards the 3 x 3 grey dilation (thicker strokes)
    "erode": (0.33, 0.67, 1.0),  # blend a towards the 3 x 3 grey erosion (thinner strokes)
    "wave": (0.03, 0.06, 0.09),  # rows shifted sideways by a sine, amplitude a share of the side
    "zoom_in": (0.9, 0.8, 0.7),  # the central share of the side enlarged to the whole image
    "vignette": (0.3, 0.6, 0.9),  # x (1 - a r^2), r the distance from the centre (1 at a corner)
    "scanlines": (0.25, 0.5, 0.75),  # every other row blended a of the way to white
}


#: A fourth evaluation-only set, added when runs that needed no training stopped widening the
#: intervals (a change chosen on the built-in kinds): the three earlier sets had been scored by
#: then. Intensities fixed before any forecast was scored on them; the first is the mildest.
FOURTH_KINDS: dict[str, tuple[float, ...]] = {
    "solarize": (0.8, 0.6, 0.4),  # pixels above this threshold inverted (x -> 1 - x)
    "row_jitter": (0.06, 0.12, 0.18),  # each row shifted sideways at random by up to this share of the side
    "ghost": (0.2, 0.35, 0.5),  # blended a of the way to a copy shifted a quarter of the side to the right
    "swirl": (0.4, 0.8, 1.2),  # rotation by this many radians at the centre, falling linearly to 0 at the edge
    "patch_dropout": (0.1, 0.2, 0.3),  # share of the cells of an 8 x 8 grid set to black
    "overlay": (0.15, 0.3, 0.45),  # blended a of the way to another image of the batch
}


def eval_corrupt(x: torch.Tensor, kind: str, intensity: float, *, seed: int = 0) -> torch.Tensor:
    """Apply evaluation-only shift ``kind`` to ``x`` (a new tensor, clamped to [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    if kind == "rotate":
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        angle = sign * math.radians(intensity)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
        out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    elif kind == "translate":
        shift = torch.rand(n, 2, generator=g) * 2 - 1
        shift = shift / shift.norm(dim=1, keepdim=True).clamp(min=1e-6) * 2 * intensity
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = shift
        out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    elif kind == "pixelate":
        small = (max(1, round(h / intensity)), max(1, round(w / intensity)))
        out = F.interpolate(F.interpolate(x, size=small, mode="area"), size=(h, w), mode="nearest")
    elif kind == "invert_blend":
        out = (1 - intensity) * x + intensity * (1 - x)
    elif kind == "occlusion":
        side = max(1, round(intensity * min(h, w)))
        top = torch.randint(0, h - side + 1, (n,), generator=g)
        left = torch.randint(0, w - side + 1, (n,), generator=g)
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        mask = (rows >= top[:, None, None]) & (rows < top[:, None, None] + side)
        mask = mask & (cols >= left[:, None, None]) & (cols < left[:, None, None] + side)
        out = x.masked_fill(mask[:, None], 0.0)
    elif kind == "gamma":
        out = x.clamp(min=0) ** intensity
    elif kind == "speckle_noise":
        out = x + intensity * x * torch.randn(x.shape, generator=g)
    elif kind == "motion_blur":
        length = int(intensity)
        kernel = torch.full((c, 1, 1, length), 1.0 / length)
        out = F.conv2d(F.pad(x, (length // 2, length - 1 - length // 2, 0, 0), mode="replicate"), kernel, groups=c)
    elif kind in ("shear", "zoom_out", "squeeze"):
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if kind == "shear":
            theta[:, 0, 1] = torch.where(torch.rand(n, generator=g) < 0.5, -intensity, intensity)
        else:
            theta[:, 1, 1] = 1.0 / intensity  # sampling outside the image leaves black borders
            if kind == "zoom_out":
                theta[:, 0, 0] = 1.0 / intensity
        out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    elif kind == "mirror":
        flip = torch.rand(n, generator=g) < intensity
        out = torch.where(flip[:, None, None, None], x.flip(3), x)
    elif kind == "posterize":
        levels = int(intensity)
        out = torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)
    elif kind == "sharpen":
        out = x + intensity * (x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    elif kind in ("dilate", "erode"):
        sign = 1.0 if kind == "dilate" else -1.0
        extreme = sign * F.max_pool2d(sign * x, 3, stride=1, padding=1)
        out = x + intensity * (extreme - x)
    elif kind in ("wave", "zoom_in"):
        scale = intensity if kind == "zoom_in" else 1.0
        grid = F.affine_grid(torch.tensor([[scale, 0.0, 0.0], [0.0, scale, 0.0]]).expand(n, 2, 3), list(x.shape), align_corners=False)
        if kind == "wave":
            grid = grid + torch.stack([2 * intensity * torch.sin(math.pi * grid[..., 1]), torch.zeros_like(grid[..., 1])], -1)  # one period over the height
        out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    elif kind == "vignette":
        rows = torch.linspace(-1, 1, h)[:, None]
        cols = torch.linspace(-1, 1, w)[None, :]
        out = x * (1 - intensity * (rows**2 + cols**2) / 2)
    elif kind == "scanlines":
        out = x.clone()
        out[:, :, ::2] = (1 - intensity) * x[:, :, ::2] + intensity
    elif kind == "solarize":
        out = torch.where(x > intensity, 1 - x, x)
    elif kind in ("row_jitter", "swirl"):
        grid = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), list(x.shape), align_corners=False)
        if kind == "row_jitter":
            offsets = (torch.rand(n, h, generator=g) * 2 - 1) * 2 * intensity  # grid units: the side is 2
            grid = grid + torch.stack([offsets[:, :, None].expand(n, h, w), torch.zeros(n, h, w)], -1)
        else:
            radius = grid.norm(dim=-1, keepdim=True)
            angle = intensity * (1 - radius).clamp(min=0)
            cos, sin = torch.cos(angle), torch.sin(angle)
            grid = torch.cat([cos * grid[..., :1] - sin * grid[..., 1:], sin * grid[..., :1] + cos * grid[..., 1:]], -1)
        out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    elif kind == "ghost":
        shift = max(1, round(w / 4))
        copy = F.pad(x, (shift, 0, 0, 0))[..., :w]
        out = (1 - intensity) * x + intensity * copy
    elif kind == "patch_dropout":
        cells = (torch.rand(n, 1, 8, 8, generator=g) < intensity).float()
        out = x * (1 - F.interpolate(cells, size=(h, w), mode="nearest"))
    elif kind == "overlay":
        other = x[torch.randperm(n, generator=g)]
        out = (1 - intensity) * x + intensity * other
    else:
        known = ", ".join([*EVAL_KINDS, *FRESH_KINDS, *THIRD_KINDS, *FOURTH_KINDS])
        raise ValueError(f"unknown evaluation shift {kind!r}; known: {known}")
    return out.clamp(0.0, 1.0)
