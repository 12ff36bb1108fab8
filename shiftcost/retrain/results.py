"""What a retraining run and an energy probe report: their results and errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shiftcost.energy import KWH_TO_JOULES, EnergyMeasurement
from shiftcost.errors import ShiftcostError
from shiftcost.jsonsafe import json_safe

#: ``stopped_by_budget``: the ``progress`` callback (a budget guard) returned exactly that reason.
STATUSES = ("reached", "already_met", "cap_reached", "stopped", "stopped_by_budget", "failed")


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that name a field of the dataclass ``cls`` (newer keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation on the held-out split.

    ``grad_norm`` is the mean global gradient L2 norm over the optimizer steps since the
    previous evaluation (None at step 0); ``epoch`` is fractional (samples seen / pool size).
    """

    step: int
    epoch: float
    samples_seen: int
    accuracy: float
    loss: float | None
    grad_norm: float | None
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RetrainResult:
    """Outcome and measured cost of one retraining run.

    ``status`` is one of :data:`STATUSES`: ``"reached"`` (the cutoff was met after
    ``steps`` steps), ``"already_met"`` (met before any step: zero steps, zero parameter
    change), ``"cap_reached"`` (stopped by ``max_steps``/``max_epochs``; the cost is what
    was spent so far and is a lower bound of the true cost), ``"stopped"`` (the ``progress``
    callback asked to stop, for the reason in ``stop_reason``; the cost is a lower bound as
    for a cap), ``"failed"`` (an exception
    ended the run; found in :attr:`RetrainError.partial`).

    ``param_change`` is ``||theta - theta0|| / sqrt(n)`` over all trainable parameters;
    ``param_change_per_layer`` is the same per module owning parameters.
    ``wall_time_s`` covers the measured procedure (evaluations and training), not the
    setup or the tracker's start and stop; ``train_time_s`` and ``eval_time_s`` split it.
    ``model`` is the fine-tuned copy (the caller's model is never modified);
    neither it nor ``holdout_indices`` appear in :meth:`to_dict`.
    """

    status: str
    reached_cutoff: bool
    steps: int
    epochs: float
    samples_seen: int
    target_accuracy: float
    initial_accuracy: float | None
    final_accuracy: float | None
    reference_accuracy: float | None
    tolerance: float
    train_samples: int
    replay_samples: int
    holdout_samples: int
    stratified_holdout: bool
    steps_per_epoch: int
    batch_size: int
    eval_every: int
    max_steps: int
    curve: list[EvalPoint]
    mean_grad_norm: float | None
    param_change: float
    param_change_l2: float
    param_change_per_layer: dict[str, float]
    n_parameters: int
    wall_time_s: float
    train_time_s: float
    eval_time_s: float
    energy: EnergyMeasurement | None
    energy_error: str | None
    device: str
    seed: int
    optimizer: str
    lr: float
    error: str | None = None
    stop_reason: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    #: Torch's CPU thread count during the run: on a CPU the energy of the same work depends on it.
    torch_threads: int | None = None
    holdout_indices: list[int] = field(default_factory=list, repr=False)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def pool_samples(self) -> int:
        """Samples per training epoch: the new training split plus the replayed reference."""
        return self.train_samples + self.replay_samples

    @property
    def grad_norms(self) -> list[float]:
        """Mean global gradient norm of each evaluation interval, in order."""
        return [p.grad_norm for p in self.curve if p.grad_norm is not None]

    @property
    def energy_kwh(self) -> float | None:
        return None if self.energy is None else self.energy.energy_kwh

    @property
    def emissions_kg(self) -> float | None:
        return None if self.energy is None else self.energy.emissions_kg

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fine-tuned weights on CPU."""
        if self.model is None:
            raise ValueError("this result carries no model")
        return {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (no tensors, no NaN)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("model", "holdout_indices"):
                continue
            value = getattr(self, f.name)
            if f.name == "curve":
                value = [p.to_dict() for p in value]
            elif f.name == "energy":
                value = None if value is None else value.to_dict()
            out[f.name] = value
        out["pool_samples"] = self.pool_samples
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrainResult":
        """Rebuild a result (without model) from :meth:`to_dict` output."""
        kwargs = _known_fields(cls, data)
        kwargs["curve"] = [EvalPoint(**p) for p in data.get("curve", [])]
        kwargs["energy"] = None if data.get("energy") is None else EnergyMeasurement.from_dict(data["energy"])
        return cls(**kwargs)


class RetrainError(ShiftcostError):
    """Retraining crashed mid-run; ``partial`` is the :class:`RetrainResult` so far
    (status ``"failed"``, steps and energy up to the crash)."""

    exit_code = 1

    def __init__(self, message: str, partial: RetrainResult) -> None:
        super().__init__(message)
        self.partial = partial


class RetrainInterrupted(KeyboardInterrupt):
    """Retraining was interrupted (Ctrl-C); ``partial`` holds the cost so far.

    A ``KeyboardInterrupt``, not an ``Exception``, so that loops catching errors
    (``except Exception``) still stop on Ctrl-C.
    """

    def __init__(self, message: str, partial: RetrainResult) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class ProbeResult:
    """Energy of one training sample-epoch of a model on this hardware.

    ``joules_per_sample_epoch = energy / (samples * epochs)``; the ``hardware`` key names
    the device the figure belongs to (GPU model, or CPU model on CPU).
    """

    architecture: str
    input_shape: tuple[int, ...]
    num_classes: int
    samples: int
    epochs: int
    batch_size: int
    steps: int
    device: str
    hardware: str
    joules_per_sample_epoch: float
    seconds_per_sample_epoch: float
    energy: EnergyMeasurement

    @property
    def kwh_per_sample_epoch(self) -> float:
        return self.joules_per_sample_epoch / KWH_TO_JOULES

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["energy"] = self.energy.to_dict()
        out["kwh_per_sample_epoch"] = self.kwh_per_sample_epoch
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeResult":
        kwargs = _known_fields(cls, data)
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
        kwargs["energy"] = EnergyMeasurement.from_dict(data["energy"])
        return cls(**kwargs)
