"""Input conversion and checks shared by every index formula and accumulator.

Every index accepts numpy arrays or torch tensors of any float dtype on any device and
computes in float64; these helpers do that conversion once, and word the one-sentence
errors for bad input (naming the layer when one is given).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shiftcost.errors import InputError

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def of_layer(layer: str | None) -> str:
    """`` of layer 'name'`` for error messages, or nothing when no layer is named."""
    return f" of layer '{layer}'" if layer else ""


def at_layer(layer: str | None) -> str:
    """`` at layer 'name'`` for error messages, or nothing when no layer is named."""
    return f" at layer '{layer}'" if layer else ""


def _where(name: str, layer: str | None) -> str:
    return f"{name}{of_layer(layer)}"


def as_float64(x: ArrayLike, name: str, *, layer: str | None = None) -> torch.Tensor:
    """Return ``x`` as a float64 torch tensor on its own device (numpy → CPU)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(x))  # torch refuses negative strides
        except (TypeError, ValueError) as exc:
            raise InputError(f"{_where(name, layer)} is not a numeric array ({exc}); pass a numpy array or torch tensor.") from None
    if t.dtype == torch.bool or t.is_complex():
        raise InputError(f"{_where(name, layer)} has dtype {t.dtype}; pass real-valued features.")
    return t.to(torch.float64)


def as_matrix(x: ArrayLike, name: str, *, layer: str | None = None) -> torch.Tensor:
    """Float64 (N, D) view of ``x``; rejects other ranks and empty input."""
    t = as_float64(x, name, layer=layer)
    if t.ndim != 2:
        raise InputError(
            f"{_where(name, layer)} has shape {tuple(t.shape)}; expected a 2-D (samples, features) matrix."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{_where(name, layer)} is empty (shape {tuple(t.shape)}); pass at least one sample and one feature.")
    return t


def as_labels(y: ArrayLike, name: str, n: int | None = None) -> torch.Tensor:
    """Int64 1-D label tensor (own device); rejects non-integral or negative values."""
    try:
        t = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(y))
    except (TypeError, ValueError):
        raise InputError(f"{name} is not an array of integer class ids; pass a numpy array or torch tensor.") from None
    if t.ndim != 1:
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected a 1-D vector of class ids.")
    if n is not None and t.shape[0] != n:
        raise InputError(f"{name} has {t.shape[0]} entries but the features have {n} rows; pass one label per sample.")
    if t.dtype.is_floating_point:
        if t.numel() and not bool(torch.all(t == torch.round(t))):
            raise InputError(f"{name} holds non-integer values; pass integer class ids.")
    elif t.dtype == torch.bool or t.is_complex():
        raise InputError(f"{name} has dtype {t.dtype}; pass integer class ids.")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"{name} holds negative class ids; class ids must be 0 or larger.")
    return t


def require_finite(t: torch.Tensor, name: str, *, layer: str | None = None) -> torch.Tensor:
    """Raise ``InputError`` when ``t`` holds NaN or infinity (costs one device sync)."""
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{_where(name, layer)} contain NaN or infinite values; check the model and the input data.")
    return t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (unchanged when it already has as many)."""
    if t.shape[0] >= rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def zero_scalar(dtype: torch.dtype) -> torch.Tensor:
    """A 0-d zero of ``dtype``: the empty state of an accumulated sum or count."""
    return torch.zeros((), dtype=dtype)


def require_same_width(mine: int | None, theirs: int | None, what: str) -> None:
    """Refuse to merge accumulator state of another feature width (None: nothing seen yet)."""
    if mine is not None and theirs is not None and mine != theirs:
        raise InputError(f"cannot merge {what} of {theirs} dimensions into {what} of {mine}; merge shards of the same layer.")
