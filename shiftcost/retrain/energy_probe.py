"""The energy of one training sample-epoch of a model on this hardware."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.energy import EnergyMeasurement, EnergyMeter, options_for_device
from shiftcost.errors import ConfigError, InputError
from shiftcost.index.capture import resolve_device
from shiftcost.recipe import Recipe
from shiftcost.retrain.results import ProbeResult
from shiftcost.retrain.training import _batches, _check_logits, _check_xy, _make_optimizer, _seeded, _trainable


@dataclass
class _ProbeRun:
    """What the measured loop did: whole epochs, optimizer steps, samples trained, seconds, energy."""

    epochs: int
    steps: int
    trained: int
    elapsed_s: float
    energy: EnergyMeasurement


def _probe_data(
    spec: Any, samples: int, x: torch.Tensor | None, y: torch.Tensor | None, gen: torch.Generator
) -> tuple[str, tuple[int, int, int], int, torch.Tensor, torch.Tensor]:
    """(architecture, input shape, classes, x, y): the given data cut to ``samples``, else random images."""
    try:
        shape = (int(spec.in_channels), int(spec.image_size), int(spec.image_size))
        num_classes = int(spec.num_classes)
        architecture = str(spec.architecture)
    except AttributeError as error:
        raise InputError(f"the model spec lacks {error.name}; pass a ModelSpec.") from error
    if x is None:
        x = torch.rand((samples, *shape), generator=gen)
        y = torch.randint(0, num_classes, (samples,), generator=gen)
    else:
        _check_xy(x, y, "the probe data")
        if len(x) < samples:
            raise InputError(f"the probe data has {len(x)} samples but the probe needs {samples}; give more or lower samples.")
        x, y = x[:samples], y[:samples].long()
    return architecture, shape, num_classes, x, y


def _measure(
    step: Any, dev: torch.device, samples: int, batch_size: int, gen: torch.Generator, *,
    epochs: int, min_seconds: float, max_epochs: int, meter_options: dict[str, Any],
) -> _ProbeRun:
    """Whole epochs of ``step`` under the energy meter until both ``epochs`` and ``min_seconds`` are done."""
    meter = EnergyMeter(**meter_options)
    meter.start()
    done_epochs = steps = trained = 0
    started = time.perf_counter()
    try:
        while done_epochs < max_epochs and (done_epochs < epochs or time.perf_counter() - started < min_seconds):
            for idx in _batches(samples, batch_size, gen):
                step(idx.to(dev))
                steps += 1
                trained += len(idx)
            done_epochs += 1
        _sync(dev)
        elapsed = time.perf_counter() - started
    finally:
        energy = meter.stop()
    return _ProbeRun(epochs=done_epochs, steps=steps, trained=trained, elapsed_s=elapsed, energy=energy)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def probe_joules_per_sample_epoch(
    model: nn.Module,
    spec: Any,
    *,
    samples: int = 512,
    epochs: int = 2,
    min_seconds: float = 3.0,
    max_epochs: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    warmup_steps: int = 3,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    country_iso_code: str = "USA",
    energy_options: dict[str, Any] | None = None,
) -> ProbeResult:
    """Measure joules per training sample-epoch of ``model`` on this hardware.

    Trains a copy of the model on ``samples`` inputs of the spec's shape (uniform random
    images and labels unless ``x``/``y`` are given) for at least ``epochs`` epochs and at
    least ``min_seconds`` (short runs are dominated by sampling granularity), after
    ``warmup_steps`` untracked steps (allocator, kernel selection). The figure is total
    measured energy (CPU + GPU + RAM, as CodeCarbon reports) / (samples x epochs).

    ``spec`` needs ``architecture``, ``num_classes``, ``in_channels`` and ``image_size``
    (a :class:`shiftcost.data.models.ModelSpec`).
    """
    if samples < 2 or epochs < 1 or batch_size < 1:
        raise ConfigError(f"the probe needs samples >= 2, epochs >= 1 and batch_size >= 1, got {samples}, {epochs}, {batch_size}.")
    gen = torch.Generator().manual_seed(seed)
    architecture, shape, num_classes, x, y = _probe_data(spec, samples, x, y, gen)
    dev = resolve_device(device)
    work = copy.deepcopy(model).to(dev).train()
    params = [p for _, p in _trainable(work)]
    if not params:
        raise InputError("the model has no trainable parameters; nothing to probe.")
    _check_logits(work, x, y, dev, "the probe data")
    optim = _make_optimizer(Recipe(optimizer=optimizer, lr=lr), params)
    x_dev, y_dev = x.to(dev), y.to(dev)

    def step(idx: torch.Tensor) -> None:
        optim.zero_grad(set_to_none=True)
        F.cross_entropy(work(x_dev[idx]), y_dev[idx]).backward()
        optim.step()

    with _seeded(seed, dev):
        for idx in _batches(samples, batch_size, gen)[:warmup_steps]:
            step(idx.to(dev))
        _sync(dev)
        options = {"country_iso_code": country_iso_code, "experiment_name": "probe", "measure_power_secs": 0.5}
        options = options_for_device(options | dict(energy_options or {}), dev.type)
        run = _measure(
            step, dev, samples, batch_size, gen,
            epochs=epochs, min_seconds=min_seconds, max_epochs=max_epochs, meter_options=options,
        )
    per = run.trained  # sample-epochs actually trained (a trailing single sample is skipped)
    if dev.type == "cuda":
        hardware = f"cuda:{torch.cuda.get_device_name(dev)}"
    else:
        hardware = f"cpu:{run.energy.cpu_model or 'unknown'}"
    return ProbeResult(
        architecture=architecture,
        input_shape=shape,
        num_classes=num_classes,
        samples=samples,
        epochs=run.epochs,
        batch_size=batch_size,
        steps=run.steps,
        device=str(dev),
        hardware=hardware,
        joules_per_sample_epoch=run.energy.energy_joules / per,
        seconds_per_sample_epoch=run.elapsed_s / per,
        energy=run.energy,
    )
