"""Learning-curve extrapolation: from an accuracy trajectory to epochs to the cutoff.

The curve is a saturating exponential with its ceiling fixed at the reference accuracy
``c`` (what the model reached on its own data before the shift):

    acc(t) = c - g0 * exp(-k t),   so   log(c - acc(t)) = log g0 - k t,

with ``t`` in epochs of the real retrain's training pool. Fixing the ceiling leaves a
linear least-squares fit in (log g0, k) that is stable on the eight to twenty noisy points
of a probe, where a free three-parameter fit (Domhan et al.'s families) is not. The time
to the target ``c - tolerance`` is ``(log g0 - log tolerance) / k``. A run that does not
improve (``k <= 0``) has no finite crossing; :func:`epochs_to_target` then returns
``inf`` and callers clip it at a horizon.

Gaps at or above the ceiling are floored at ``gap_floor`` so one lucky evaluation does
not produce ``log(0)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CurveFit", "fit_curve", "epochs_to_target"]

GAP_FLOOR = 0.005


@dataclass(frozen=True)
class CurveFit:
    """``log(c - acc(t)) = log_gap0 - rate * t``; ``points`` is how many evaluations it used."""

    log_gap0: float
    rate: float
    ceiling: float
    points: int

    def accuracy(self, epochs: float) -> float:
        return self.ceiling - math.exp(self.log_gap0 - self.rate * epochs)


def fit_curve(epochs: Sequence[float], accuracy: Sequence[float], ceiling: float, gap_floor: float = GAP_FLOOR) -> CurveFit:
    """Least-squares fit of the log gap to the ceiling against epochs (at least one point).

    With one distinct time the rate is 0 (nothing to extrapolate from).
    """
    t = np.asarray(epochs, dtype=float)
    gap = np.log(np.maximum(ceiling - np.asarray(accuracy, dtype=float), gap_floor))
    if len(t) == 0:
        raise ValueError("a learning curve needs at least one evaluation")
    centred = t - t.mean()
    spread = float(centred @ centred)
    rate = 0.0 if spread <= 1e-12 else -float(centred @ (gap - gap.mean())) / spread
    log_gap0 = float(gap.mean() + rate * t.mean())
    return CurveFit(log_gap0=log_gap0, rate=rate, ceiling=float(ceiling), points=len(t))


def epochs_to_target(fit: CurveFit, target: float, gap_floor: float = GAP_FLOOR) -> float:
    """Epochs (from t = 0) until the fitted curve reaches ``target``; ``inf`` if never."""
    gap_target = max(fit.ceiling - target, gap_floor)
    needed = fit.log_gap0 - math.log(gap_target)
    if needed <= 0:
        return 0.0
    if fit.rate <= 0:
        return math.inf
    return needed / fit.rate
