"""Fitting the sweep's intensities to the model being calibrated.

The default intensities were chosen on the digits demo CNN. Another model can shrug them off
(a resnet18 at 32x32 keeps 0.96 accuracy or more at every default noise level: 9 of its 15
noise points needed no training, the rest under half an epoch) or collapse under them. One
forward pass per candidate intensity, on a sample of the new data, finds how far each kind's
ladder must be stretched for the model to lose the share of its accuracy the demo loses
(:data:`shiftcost.shifts.DEFAULT_TOP_DROP`); the retrains then run on the stretched ladder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shiftcost.data.importing import accuracy_of
from shiftcost.shifts import DEFAULT_TOP_DROP, corrupt, max_intensity

#: Multiples of a kind's strongest intensity tried, mildest first.
SCALES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Images of the new data the scan evaluates on: enough for a 0.02-wide accuracy step.
SCAN_SAMPLES = 512


@dataclass(frozen=True)
class KindFit:
    """How one kind's intensities were stretched, and what the scan saw."""

    kind: str
    scale: float
    goal_accuracy: float
    #: (intensity, accuracy) at each strongest intensity tried, mildest first.
    scanned: tuple[tuple[float, float], ...]
    #: False when even the strongest intensity tried left the model above the goal.
    reached: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "scale": self.scale, "goal_accuracy": self.goal_accuracy,
            "scanned": [list(pair) for pair in self.scanned], "reached": self.reached,
        }


def describe_fits(fits: Sequence[Mapping[str, Any]]) -> str:
    """``kind xscale`` for each fit as :meth:`KindFit.to_dict` records it, naming a kind whose
    strongest intensity tried still left the model above its goal."""
    return ", ".join(
        f"{fit['kind']} x{fit['scale']:.2g}" + ("" if fit["reached"] else " (its strongest still left the model above the goal)")
        for fit in fits
    )


def fit_sweep(
    model: nn.Module,
    new_x: torch.Tensor,
    new_y: torch.Tensor,
    sweep: Mapping[str, Sequence[float]],
    *,
    num_classes: int,
    goals: Mapping[str, float] = DEFAULT_TOP_DROP,
    seed: int = 0,
    device: str | torch.device = "cpu",
    samples: int = SCAN_SAMPLES,
) -> tuple[dict[str, tuple[float, ...]], list[KindFit]]:
    """``sweep`` with each kind's intensities multiplied by the scale at which ``model`` loses
    ``goals[kind]`` of its above-chance accuracy on the (sampled) new data at the kind's
    strongest intensity; and what was found per kind.

    Scales are tried from :data:`SCALES` up to the kind's maximum intensity; between the last
    scale above the goal and the first at or below it, the scale is interpolated linearly in
    accuracy. A kind with no goal, or a model at chance on the clean data, keeps its intensities.
    """
    order = torch.randperm(len(new_x), generator=torch.Generator().manual_seed(seed))[:samples]
    x, y = new_x[order], new_y[order]
    chance = 1.0 / num_classes
    clean = accuracy_of(model, x, y, device=device)
    fitted: dict[str, tuple[float, ...]] = {}
    fits: list[KindFit] = []
    for kind, intensities in sweep.items():
        levels = tuple(float(v) for v in intensities)
        strongest = max(levels, default=0.0)
        if kind not in goals or strongest <= 0 or clean <= chance:
            fitted[kind] = levels
            continue
        goal = clean - goals[kind] * (clean - chance)
        scale, scanned, reached = _scan(model, x, y, kind, strongest, goal, seed, device)
        fitted[kind] = _stretch(levels, scale, max_intensity(kind))
        fits.append(KindFit(kind, scale, goal, scanned, reached))
    return fitted, fits


def _scan(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, strongest: float, goal: float, seed: int, device: str | torch.device
) -> tuple[float, tuple[tuple[float, float], ...], bool]:
    """The scale that brings the accuracy at ``strongest`` × scale down to ``goal``."""
    maximum = max_intensity(kind)
    scales = [s for s in SCALES if maximum is None or strongest * s < maximum]
    if maximum is not None:
        scales.append(maximum / strongest)  # the kind's own limit is the last candidate
    scanned: list[tuple[float, float]] = []
    previous: tuple[float, float] | None = None
    for scale in scales:
        accuracy = accuracy_of(model, corrupt(x, kind, strongest * scale, seed=seed), y, device=device)
        scanned.append((float(f"{strongest * scale:.4g}"), accuracy))
        if accuracy <= goal:
            if previous is None:
                return scale, tuple(scanned), True
            before, accuracy_before = previous
            share = (accuracy_before - goal) / (accuracy_before - accuracy)
            return before + share * (scale - before), tuple(scanned), True
        previous = (scale, accuracy)
    return scales[-1], tuple(scanned), False


def _stretch(levels: Sequence[float], scale: float, maximum: float | None) -> tuple[float, ...]:
    """``levels`` × ``scale`` to 3 significant figures, within the maximum, without repeats."""
    stretched: list[float] = []
    for level in levels:
        value = float(f"{level * scale:.3g}")
        value = value if maximum is None else min(value, maximum)
        if value not in stretched:
            stretched.append(value)
    return tuple(stretched)
