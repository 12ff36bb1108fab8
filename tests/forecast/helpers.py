"""Synthetic calibration rows with index and probe features, and a tiny real model."""

from __future__ import annotations

import math

import numpy as np
import torch

from shiftcost.data.demo import train_classifier
from shiftcost.data.models import ModelSpec, build_model
from shiftcost.energy import HostEnergyRate
from shiftcost.forecast.forecaster import Forecaster

INDEX = ("resque_dist", "inv_ari", "layer_shift", "accuracy", "mean_loss", "mean_entropy")
#: kWh == sample counts: expected spends are plain arithmetic.
UNIT_RATE = HostEnergyRate(joules_per_sample=3.6e6, spread=0.0, runs=0)


def forecast_rows(seed: int = 0, kinds: int = 5, per_kind: int = 8, cap: float | None = None) -> list[dict]:
    """Runs whose log1p(epochs) follows the probe's curve feature more closely than the indices."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(kinds):
        hardness = 0.5 + 0.25 * k
        for level in np.linspace(0.1, 1.0, per_kind):
            z = 0.3 + 1.5 * level * hardness + float(rng.normal(0, 0.1))
            epochs = math.expm1(z)
            censored = cap is not None and epochs > cap
            rows.append(
                {
                    "corruption": f"kind{k}",
                    "resque_dist": float(level + rng.normal(0, 0.05)),
                    "inv_ari": float(0.5 * level + rng.normal(0, 0.05)),
                    "layer_shift": float(level * 0.3),
                    "accuracy": float(0.95 - 0.4 * level),
                    "mean_loss": float(0.1 + level),
                    "mean_entropy": float(0.2 + 0.5 * level),
                    "curve_log_epochs": float(z + rng.normal(0, 0.05)),
                    "probe_progress": float(1.0 / (1.0 + z)),
                    "probe_loss_drop": float(0.5 / (1.0 + z)),
                    "probe_gap": float(0.02 * z - 0.03),
                    "cutoff_log_epochs": float(z),
                    "probe_initial_gap": float(0.1 * z),
                    "probe_first_step_gain": float(0.02 * z),
                    "probe_bn_gain": float(0.03 * z),
                    "epochs": cap if censored else epochs,
                    "reached_cutoff": not censored,
                    "samples": 300,
                }
            )
    return rows


def long_retrain_rows() -> list[dict]:
    """:func:`forecast_rows` with retrains ten times as long, so that a small probe is cheap beside them."""
    return [row | {"epochs": 10.0 * row["epochs"]} for row in forecast_rows()]


def fitted_forecaster(cap: float = 15.0) -> Forecaster:
    return Forecaster.fit(forecast_rows(), features=list(INDEX), max_epochs=cap, energy_rate=UNIT_RATE, batch_size=16)


def bars(n_per_class: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 8x8 images: a bright band at one of three heights, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = 0.15 * torch.rand(len(y), 1, 8, 8, generator=g)
    for k in range(3):
        x[y == k, :, 1 + 2 * k : 3 + 2 * k, :] += 0.8
    order = torch.randperm(len(y), generator=g)
    return x.clamp(0, 1)[order], y[order]


def trained_bars() -> tuple[torch.nn.Module, ModelSpec, torch.Tensor, torch.Tensor]:
    """The digits CNN trained on :func:`bars` at one thread, seeded: the command-line tests' small model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = bars()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, spec = build_model("digits_cnn", 3, in_channels=1, image_size=8)
        train_classifier(model, x, y, epochs=8, batch_size=16, lr=1e-2)
    finally:
        torch.set_num_threads(threads)
    return model, spec, x, y
