"""Input checks and small helpers shared by the sweep, its analysis and its files."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shiftcost.errors import ConfigError, InputError
from shiftcost.shifts import corrupt


def _check_plan(sweep: Mapping[str, Sequence[float]], new_x: torch.Tensor) -> list[tuple[str, float]]:
    """The (kind, intensity) points in order; unknown kinds and bad intensities fail up front."""
    if not isinstance(sweep, Mapping) or not sweep:
        raise ConfigError("the sweep is empty; give at least one corruption kind with its intensities.")
    plan = []
    for kind, intensities in sweep.items():
        values = list(intensities)
        if not values:
            raise ConfigError(f"corruption {kind!r} has no intensities; give at least one (0 for the clean point).")
        for intensity in values:
            corrupt(new_x[:1], kind, intensity)  # raises InputError for an unknown kind or a bad intensity
            plan.append((kind, float(intensity)))
    return plan


def _round_robin(plan: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Every kind's first point, then every kind's second, and so on."""
    rank: dict[str, int] = {}
    ranked = []
    for order, (kind, intensity) in enumerate(plan):
        rank[kind] = rank.get(kind, -1) + 1
        ranked.append((rank[kind], order, kind, intensity))
    return [(kind, intensity) for _, _, kind, intensity in sorted(ranked)]


def _check_data(x: Any, y: Any, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or len(x) == 0:
        raise InputError(f"{what} must be a non-empty image tensor N x C x H x W, got {getattr(x, 'shape', type(x).__name__)}.")
    if y is None:
        raise InputError(f"{what} has no labels; a calibration sweep needs a label per image (it retrains on them).")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{what} has {len(x)} images but labels of shape {getattr(y, 'shape', None)}; give one label per image.")


def _check_settings(repeats: int, threads: int | None, level: float, features: Sequence[str]) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive number of retraining runs per point, got {repeats!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}.")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie strictly between 0 and 1, got {level!r}.")
    if not list(features):
        raise ConfigError("the cost model needs at least one feature, e.g. ['resque_dist'].")


def _resolve_device(device: str | torch.device) -> torch.device:
    from shiftcost.retrain import resolve_device

    return resolve_device(device)


def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (user + system)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _describe(error: BaseException) -> str:
    """The message of a user-facing error as is; anything else with its type."""
    return str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"


def _mean(values: Any) -> float | None:
    numbers = [float(v) for v in values if _finite(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _fmt(value: Any, spec: str) -> str:
    return "-" if not _finite(value) else format(value, spec)


def _fmt_load(value: Any) -> str:
    return "-" if not value else "/".join(f"{v:.1f}" for v in value)


def _pct(value: Any) -> str:
    return "-" if not _finite(value) else f"{100 * value:.0f}%"




def _cost_model_summary(model: Any) -> dict[str, Any]:
    return {
        "version": model.version_,
        "features": list(model.features_),
        "coefficients": {name: float(c) for name, c in zip(model.features_, model.coef_)},
        "intercept": model.intercept_,
        "sigma": model.sigma_,
        "n_train": model.n_train_,
        "n_censored": model.n_censored_,
        "cap_epochs": model.cap_epochs_,
        "loo": model.loo_,
    }
