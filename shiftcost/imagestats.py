"""Cheap per-image statistics for drift tests: brightness, contrast, sharpness, noise.

All four are computed on the luma of each image, vectorised over a batch ``N x C x H x W``
of values in ``[0, 1]``, on whatever device the batch lives on, so the engine can take
them in the same pass as the indices:

* ``brightness`` — mean luma.
* ``contrast`` — RMS contrast: the (population) standard deviation of the luma.
* ``sharpness`` — variance of the Laplacian (4-neighbour 3x3 kernel, valid region only),
  the classic focus measure of Pech-Pacheco et al. (2000); blur lowers it.
* ``noise`` — Immerkaer's fast noise estimate (J. Immerkaer, "Fast Noise Variance
  Estimation", Computer Vision and Image Understanding 64(2):300-302, 1996):
  ``sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * N|`` with
  ``N = [[1,-2,1],[-2,4,-2],[1,-2,1]]``, the difference of two Laplacians, which cancels
  smooth image structure so that for additive Gaussian noise of standard deviation
  ``s`` the estimate is ``s`` in expectation. Reported as a standard deviation, in the
  units of the pixel values.

Luma: one channel is used as is; three channels are weighted by ITU-R BT.601
(0.299, 0.587, 0.114); any other channel count is averaged. Borders are never padded
(the filters use the valid region), so a constant image has exactly zero contrast,
sharpness and noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from shiftcost.errors import InputError

__all__ = ["IMAGE_STAT_NAMES", "image_stats", "luma", "stats_table"]

IMAGE_STAT_NAMES: tuple[str, ...] = ("brightness", "contrast", "sharpness", "noise")

_BT601 = (0.299, 0.587, 0.114)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
_IMMERKAER = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))


def luma(images: torch.Tensor) -> torch.Tensor:
    """The ``N x 1 x H x W`` luma of a batch ``N x C x H x W`` (see the module notes)."""
    _check(images)
    channels = images.shape[1]
    if channels == 1:
        return images
    if channels == 3:
        weights = torch.tensor(_BT601, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True)


@torch.no_grad()
def image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image brightness, contrast, sharpness and noise of a batch ``N x C x H x W``.

    Returns a dict keyed by :data:`IMAGE_STAT_NAMES`, each a 1-D tensor of length ``N``
    on the batch's device and in its floating dtype. Pure: the batch is not modified.
    """
    gray = luma(images)
    flat = gray.flatten(start_dim=1)
    brightness = flat.mean(dim=1)
    contrast = flat.std(dim=1, correction=0)

    kernels = torch.tensor((_LAPLACIAN, _IMMERKAER), dtype=gray.dtype, device=gray.device).unsqueeze(1)
    responses = F.conv2d(gray, kernels)  # N x 2 x (H-2) x (W-2), valid region only
    laplacian = responses[:, 0].flatten(start_dim=1)
    sharpness = laplacian.var(dim=1, correction=0)
    height, width = gray.shape[-2:]
    noise = responses[:, 1].abs().sum(dim=(1, 2)) * (math.sqrt(math.pi / 2.0) / (6.0 * (width - 2) * (height - 2)))
    return {"brightness": brightness, "contrast": contrast, "sharpness": sharpness, "noise": noise}


def stats_table(stats: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The statistics as a dict of float64 numpy columns (CPU), ready for a data frame."""
    return {name: stats[name].detach().to("cpu", torch.float64).numpy() for name in IMAGE_STAT_NAMES}


def _check(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"image statistics need a torch tensor of images, got {type(images).__name__}; convert the batch with torch.as_tensor first.")
    if images.ndim != 4:
        raise InputError(f"image statistics need a batch shaped N x C x H x W, got shape {tuple(images.shape)}; add the missing batch or channel dimension.")
    if not images.is_floating_point():
        raise InputError(f"image statistics need floating-point pixels in [0, 1], got dtype {images.dtype}; divide integer images by their maximum (e.g. 255) first.")
    if images.shape[0] == 0 or images.shape[1] == 0:
        raise InputError(f"image statistics got an empty batch of shape {tuple(images.shape)}; pass at least one image with at least one channel.")
    if images.shape[-1] < 3 or images.shape[-2] < 3:
        raise InputError(f"image statistics need images of at least 3 x 3 pixels, got {tuple(images.shape[-2:])}; resize the images or skip these statistics.")
