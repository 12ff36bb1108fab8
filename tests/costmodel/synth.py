"""Small synthetic calibration sets with a known truth."""

from __future__ import annotations

import math

import numpy as np


def linear_rows(
    seed: int,
    n: int = 40,
    *,
    intercept: float = 0.4,
    slopes: tuple[float, float] = (2.0, 0.5),
    noise: float = 0.25,
    cap_epochs: float | None = None,
    offset: float = 1.0,
) -> list[dict]:
    """Runs whose log(epochs + offset) is linear in resque_dist and mean_entropy plus normal noise.

    With ``cap_epochs``, runs that would need more are recorded as censored at the cap.
    Every row also carries the latent ``true_epochs``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        x1 = float(rng.uniform(0.0, 1.0))
        x2 = float(rng.uniform(0.0, 1.0))
        z = intercept + slopes[0] * x1 + slopes[1] * x2 + float(rng.normal(0.0, noise))
        true_epochs = max(math.exp(z) - offset, 0.0)
        censored = cap_epochs is not None and true_epochs > cap_epochs
        rows.append(
            {
                "resque_dist": x1,
                "mean_entropy": x2,
                "epochs": cap_epochs if censored else true_epochs,
                "reached_cutoff": not censored,
                "true_epochs": true_epochs,
                "true_z": z,
            }
        )
    return rows


def typed_rows(seed: int, per_type: int = 7) -> list[dict]:
    """Five 'corruption types' sharing one cost law in (resque_dist, inv_ari, accuracy), so a
    held-out type is predictable from the others; each type spans its own feature range."""
    rng = np.random.default_rng(seed)
    rows = []
    for t, (speed, acc_drop) in enumerate([(1.0, 0.3), (0.6, 0.5), (1.4, 0.2), (0.8, 0.4), (1.2, 0.25)]):
        for level in np.linspace(0.1, 1.0, per_type):
            r = float(level * speed * rng.uniform(0.9, 1.1))
            inv = float(min(1.0, 0.3 * r + 0.2 * level + rng.normal(0, 0.02)))
            acc = float(0.97 - acc_drop * level)
            z = 0.2 + 1.2 * r + 1.0 * inv + 2.0 * (0.97 - acc) + float(rng.normal(0.0, 0.15))
            epochs = math.exp(z) - 1.0
            rows.append(
                {
                    "corruption": f"type{t}",
                    "intensity": float(level),
                    "resque_dist": r,
                    "inv_ari": inv,
                    "accuracy": acc,
                    "epochs": epochs,
                    "reached_cutoff": True,
                    "samples": 500,
                    "energy_kwh": epochs * 500 * 3.0 / 3.6e6,
                }
            )
    return rows
