"""Fine-tune a model until it recovers a target accuracy on new data, and measure the cost.

:func:`retrain_to_cutoff` is the executor behind every real retraining and every
calibration point: it fine-tunes a *copy* of the model on a labelled batch (optionally
replaying some reference data), evaluates on a held-out split of the new data every
``eval_every`` optimizer steps, and stops at the first evaluation whose accuracy reaches
the target, or at a step/epoch cap. Everything a cost model or an audit needs is recorded
in a :class:`RetrainResult`: steps and fractional epochs, the accuracy curve, gradient
norms, parameter change, wall time and CodeCarbon's energy/carbon figures.

:func:`probe_joules_per_sample_epoch` measures the energy of one training sample-epoch of
a model on the current hardware, so predicted epochs convert into kWh for any batch size.

Neither function touches the caller's model or global random state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.energy import KWH_TO_JOULES, EnergyMeasurement, EnergyMeasurementError, EnergyMeter
from shiftcost.errors import ConfigError, InputError, ShiftcostError
from shiftcost.forecast.protocol import cutoff_reached
from shiftcost.jsonsafe import json_safe
from shiftcost.recipe import OPTIMIZERS, Recipe, RetrainConfig, build_augmentation, load_entry_point, pool_samples

__all__ = [
    "EvalPoint",
    "RetrainResult",
    "RetrainError",
    "RetrainInterrupted",
    "ProbeResult",
    "retrain_to_cutoff",
    "probe_joules_per_sample_epoch",
    "resolve_device",
    "RetrainConfig",
    "ProgressCallback",
    "STATUSES",
    "OPTIMIZERS",
]

#: ``stopped_by_budget``: the ``progress`` callback (a budget guard) returned exactly that reason.
STATUSES = ("reached", "already_met", "cap_reached", "stopped", "stopped_by_budget", "failed")


# --------------------------------------------------------------------------- results


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
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
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
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
        kwargs["energy"] = EnergyMeasurement.from_dict(data["energy"])
        return cls(**kwargs)




# --------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device {device!r} is not a torch device name; use 'auto', 'cpu' or 'cuda'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'.")
    return resolved


def _check_xy(x: Any, y: Any, what: str, *, labels_needed: bool = True) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor of images, got {type(x).__name__}.")
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{what} is empty or has no sample dimension (shape {tuple(x.shape)}); give at least one sample.")
    if y is None:
        if labels_needed:
            raise InputError(f"retraining needs labels; {what} has none: give a labelled batch.")
        return
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"labels of {what} must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}.")
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{what} has {len(x)} samples but {tuple(y.shape)} labels; give one label per sample.")
    if int(y.min()) < 0:
        raise InputError(f"{what} has negative labels; labels must be class ids 0..K-1.")
    if not torch.isfinite(x).all():
        raise InputError(f"{what} contains NaN or infinite values; clean the batch first.")


def _stopped_status(reason: str) -> str:
    """A budget guard's stop keeps its own status; any other callback's reason is "stopped"."""
    return "stopped_by_budget" if reason == "stopped_by_budget" else "stopped"


def _holdout_split(y: torch.Tensor, fraction: float, seed: int, min_holdout: int, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Seeded split of indices into (train, holdout), stratified by label when possible."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_holdout = int(round(n * fraction))
    if n_holdout < min_holdout or n - n_holdout < 1:
        needed = max(math.ceil(min_holdout / fraction), math.ceil(1 / (1 - fraction)) if fraction < 1 else 2, min_holdout + 1)
        raise InputError(
            f"{what} has {n} labelled samples, too few for a held-out split of {fraction:.0%} with at least "
            f"{min_holdout} samples and 1 training sample; give at least {needed} samples or change the holdout settings."
        )
    labels = y.cpu().numpy()
    counts = np.bincount(labels)
    present = counts[counts > 0]
    stratify = labels if (present.min() >= 2 and n_holdout >= len(present) and n - n_holdout >= len(present)) else None
    train, holdout = train_test_split(np.arange(n), test_size=n_holdout, random_state=seed, stratify=stratify)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(holdout)), stratify is not None


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
    model.train(was_training)
    return correct / len(x), loss_sum / len(x)


def _check_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, what: str) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x[:2].to(device))
    model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != min(2, len(x)):
        raise InputError(f"the model must return class logits of shape (N, K), got {getattr(logits, 'shape', type(logits).__name__)}.")
    if int(y.max()) >= logits.shape[1]:
        raise InputError(f"{what} has label {int(y.max())} but the model has only {logits.shape[1]} outputs; check the labels or the model.")


def _make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _make_schedule(
    recipe: Recipe, optim: torch.optim.Optimizer, step_cap: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per optimizer step; cosine reaches 0 at the step cap."""
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, step_cap))
    if recipe.schedule == "step":
        every = max(1, int(round(recipe.step_epochs * steps_per_epoch)))
        return torch.optim.lr_scheduler.StepLR(optim, step_size=every, gamma=recipe.gamma)
    return None


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _param_change(
    start: dict[str, torch.Tensor], model: nn.Module
) -> tuple[float, float, dict[str, float], int]:
    """(||dθ||/sqrt(n), ||dθ||, per-module ||dθ||/sqrt(n_module), n), in float64."""
    per_module_sq: dict[str, float] = {}
    per_module_n: dict[str, int] = {}
    total_sq = 0.0
    total_n = 0
    for name, p in _trainable(model):
        delta = p.detach().double().cpu() - start[name]
        sq = float(delta.square().sum())
        module = name.rsplit(".", 1)[0] if "." in name else ""
        per_module_sq[module] = per_module_sq.get(module, 0.0) + sq
        per_module_n[module] = per_module_n.get(module, 0) + delta.numel()
        total_sq += sq
        total_n += delta.numel()
    per_module = {m: math.sqrt(per_module_sq[m]) / math.sqrt(per_module_n[m]) for m in per_module_sq}
    l2 = math.sqrt(total_sq)
    return (l2 / math.sqrt(total_n) if total_n else 0.0), l2, per_module, total_n


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches; a trailing batch of one sample is dropped
    (batch norm cannot train on it) unless the pool itself has one sample."""
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()
    return chunks


def _fork_rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


# --------------------------------------------------------------------------- retrain

#: What a ``progress`` callback may return: ``None`` to go on, or a sentence saying why
#: the run must stop now (for example a budget guard); the run then ends with status
#: ``"stopped"`` and the sentence in :attr:`RetrainResult.stop_reason`.
ProgressCallback = Callable[[EvalPoint, int, float], "str | None"]


@dataclass
class _Tally:
    """Counters of one run, shared by the training loop and its evaluations."""

    step: int = 0
    samples: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    grad_sum: float = 0.0
    grad_steps: int = 0
    grad_total: float = 0.0
    loop_end: float | None = None
    stop_reason: str | None = None


def retrain_to_cutoff(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    config: RetrainConfig | None = None,
    *,
    reference_x: torch.Tensor | None = None,
    reference_y: torch.Tensor | None = None,
    target_accuracy: float | None = None,
    reference_accuracy: float | None = None,
    progress: ProgressCallback | None = None,
    source: str = "the batch",
    **settings: Any,
) -> RetrainResult:
    """Fine-tune a copy of ``model`` on ``(x, y)`` until held-out accuracy reaches the target.

    ``config`` (a :class:`~shiftcost.recipe.RetrainConfig`, default settings when None)
    holds the recipe, cutoff, caps and energy settings; ``settings`` change single ones by
    their flat names (``lr=``, ``tolerance=``, ``max_steps=`` ..., see
    :meth:`RetrainConfig.replace`).

    The new data is split (seeded, stratified by label when every class has two samples)
    into a training part and a held-out part of ``holdout_fraction``. Training uses the
    training part plus, when the recipe's replay share is above 0 (by default it is 0.5
    whenever labelled reference data is given), reference samples drawn at random so that
    they make up that share of each epoch's pool (capped by the reference size). Every ``eval_every`` optimizer steps (default: a quarter epoch) the held-out
    accuracy is measured; the run stops at the first evaluation where it is at least the
    target, or when ``max_steps`` steps / ``max_epochs`` epochs are spent (the last step is
    always evaluated). The target is ``target_accuracy`` if given, else
    ``reference_accuracy - tolerance``, else the model's accuracy on
    ``(reference_x, reference_y)`` minus ``tolerance``.

    ``progress(point, step_cap, target)`` is called after every evaluation (the first at
    step 0). It may return a sentence to stop the run there: status ``"stopped"``, the
    sentence in ``stop_reason``, the cost so far recorded as for a cap.

    Energy is measured with CodeCarbon around the evaluations and training (not the data
    preparation); ``energy_options`` go to :class:`~shiftcost.energy.EnergyMeter`. If the
    measurement fails, :class:`~shiftcost.energy.EnergyMeasurementError` is raised with the
    finished result in ``.partial`` (``require_energy=False`` records the error in
    ``energy_error`` instead).

    ``progress(point, step_cap, target)`` is called after every evaluation; when it returns
    ``"stopped_by_budget"`` (see :class:`shiftcost.forecast.guard.BudgetGuard`) the run ends
    there with that status, ``reached_cutoff`` false.

    Repeatable: with the same seed (and on CPU, the same thread count) the same steps and
    accuracies come out. The caller's model and the global random state are untouched.

    Raises :class:`~shiftcost.errors.InputError` for unlabelled or too small batches and
    :class:`RetrainError` (or :class:`RetrainInterrupted` on Ctrl-C) carrying the partial
    result when a step fails.
    """
    cfg = (config or RetrainConfig()).replace(**settings)
    recipe, cutoff = cfg.recipe, cfg.cutoff
    _check_xy(x, y, source)
    assert y is not None
    has_reference = reference_x is not None
    replay_fraction = recipe.replay_with(has_reference and reference_y is not None)
    if has_reference:
        needs_labels = replay_fraction > 0 or (target_accuracy is None and reference_accuracy is None)
        _check_xy(reference_x, reference_y, "the reference data", labels_needed=needs_labels)
        if tuple(reference_x.shape[1:]) != tuple(x.shape[1:]):
            raise InputError(
                f"the reference data has samples of shape {tuple(reference_x.shape[1:])} but {source} has "
                f"{tuple(x.shape[1:])}; both must match the model input."
            )
    elif replay_fraction > 0:
        raise InputError("replay_fraction > 0 needs labelled reference data to replay; pass reference_x and reference_y.")
    augmentation = build_augmentation(recipe.augment)
    train_step = load_entry_point(recipe.train_step, "The training step") if recipe.train_step else None

    dev = resolve_device(cfg.device)
    work = copy.deepcopy(model).to(dev)
    params = _trainable(work)
    if not params:
        raise InputError("the model has no trainable parameters; nothing to retrain.")
    _check_logits(work, x, y, dev, source)

    if target_accuracy is None:
        if reference_accuracy is None:
            if not has_reference:
                raise InputError(
                    "no target accuracy: pass target_accuracy, reference_accuracy or labelled reference data."
                )
            _check_logits(work, reference_x, reference_y, dev, "the reference data")
            reference_accuracy, _ = _evaluate(work, reference_x, reference_y, dev, cutoff.eval_batch_size)
        target_accuracy = max(0.0, reference_accuracy - cutoff.tolerance)
    if not 0.0 <= target_accuracy <= 1.0:
        raise ConfigError(f"target accuracy must lie in [0, 1], got {target_accuracy!r}.")

    # Data: holdout split of the new data, optional replay.
    train_idx, holdout_idx, stratified = _holdout_split(y, cutoff.holdout_fraction, cfg.seed, cutoff.min_holdout, source)
    x_hold, y_hold = x[holdout_idx], y[holdout_idx].long()
    x_pool, y_pool = x[train_idx], y[train_idx].long()
    n_replay = 0
    if replay_fraction > 0:
        n_replay = pool_samples(len(train_idx), replay_fraction, len(reference_x)) - len(train_idx)
        replay_gen = torch.Generator().manual_seed(cfg.seed + 1)
        chosen = torch.randperm(len(reference_x), generator=replay_gen)[:n_replay]
        x_pool = torch.cat([x_pool, reference_x[chosen].to(x_pool.dtype)])
        y_pool = torch.cat([y_pool, reference_y[chosen].long()])
    n_pool = len(x_pool)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    epoch_batches = len(_batches(n_pool, recipe.batch_size, torch.Generator().manual_seed(cfg.seed)))
    step_cap = cfg.caps.max_steps if cfg.caps.max_steps is not None else 10**12
    if cfg.caps.max_epochs is not None:
        step_cap = min(step_cap, max(1, int(math.ceil(cfg.caps.max_epochs * epoch_batches))))
    every = cutoff.eval_every if cutoff.eval_every is not None else max(1, epoch_batches // 4)

    start_params = {name: p.detach().double().cpu().clone() for name, p in params}
    optim = _make_optimizer(recipe, [p for _, p in params])
    schedule = _make_schedule(recipe, optim, step_cap, epoch_batches)

    curve: list[EvalPoint] = []
    tally = _Tally()
    status = "failed"
    error_text: str | None = None
    meter: EnergyMeter | None = None
    energy: EnergyMeasurement | None = None
    energy_error: str | None = None
    crash: BaseException | None = None
    t_zero = time.perf_counter()

    def evaluate_now() -> EvalPoint:
        t = time.perf_counter()
        acc, loss = _evaluate(work, x_hold, y_hold, dev, cutoff.eval_batch_size)
        _train_mode(work, recipe.freeze_batchnorm)
        tally.eval_s += time.perf_counter() - t
        grad = tally.grad_sum / tally.grad_steps if tally.grad_steps else None
        tally.grad_sum, tally.grad_steps = 0.0, 0
        point = EvalPoint(
            step=tally.step,
            epoch=tally.samples / n_pool,
            samples_seen=tally.samples,
            accuracy=acc,
            loss=loss,
            grad_norm=grad,
            elapsed_s=time.perf_counter() - t_zero,
        )
        curve.append(point)
        if progress is not None:
            reason = progress(point, step_cap, target_accuracy)
            if reason:
                tally.stop_reason = str(reason)
        return point

    def train_on(idx: torch.Tensor) -> None:
        t = time.perf_counter()
        xb = x_pool[idx]
        if augmentation is not None:
            xb = torch.stack([augmentation(image) for image in xb])
        xb = xb.to(dev, non_blocking=True)
        yb = y_pool[idx].to(dev, non_blocking=True)
        optim.zero_grad(set_to_none=True)
        loss = train_step(work, xb, yb) if train_step is not None else F.cross_entropy(work(xb), yb)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"the training step must return the scalar loss tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {tally.step + 1}")
        loss.backward()
        grads = [p.grad.detach() for _, p in params if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        optim.step()
        if schedule is not None:
            schedule.step()
        tally.step += 1
        tally.samples += len(idx)
        tally.grad_sum += grad_norm
        tally.grad_total += grad_norm
        tally.grad_steps += 1
        tally.train_s += time.perf_counter() - t

    def run_loop() -> str:
        if evaluate_now().accuracy >= target_accuracy:
            return "already_met"
        if tally.stop_reason:
            return _stopped_status(tally.stop_reason)
        while True:
            for idx in _batches(n_pool, recipe.batch_size, shuffle_gen):
                train_on(idx)
                if tally.step % every == 0 or tally.step >= step_cap:
                    if evaluate_now() and cutoff_reached(curve, target_accuracy):  # the run's evaluations, the new one last
                        return "reached"
                    if tally.stop_reason:
                        return _stopped_status(tally.stop_reason)
                    if tally.step >= step_cap:
                        return "cap_reached"

    if cfg.energy.track:
        options = {"country_iso_code": cfg.energy.country_iso_code, "experiment_name": "retrain"}
        options.update(cfg.energy.options or {})
        meter = EnergyMeter(**options)
        meter.start()  # fails here, before any compute is spent, if CodeCarbon cannot start
    try:
        t_zero = time.perf_counter()
        with torch.random.fork_rng(devices=_fork_rng_devices(dev)):
            torch.manual_seed(cfg.seed)  # dropout, augmentation and other randomness
            _train_mode(work, recipe.freeze_batchnorm)
            status = run_loop()
    except BaseException as exc:  # noqa: BLE001 - every failure must keep its partial cost
        tally.loop_end = time.perf_counter()
        status = "failed"
        crash = exc
        error_text = f"{type(exc).__name__}: {exc}"
    finally:
        if tally.loop_end is None:
            tally.loop_end = time.perf_counter()
        if meter is not None:
            try:
                energy = meter.stop()
            except EnergyMeasurementError as exc:
                energy_error = str(exc)

    change, change_l2, per_layer, n_params = _param_change(start_params, work)
    steps = tally.step
    result = RetrainResult(
        status=status,
        reached_cutoff=status in ("reached", "already_met"),
        steps=steps,
        epochs=tally.samples / n_pool,
        samples_seen=tally.samples,
        target_accuracy=float(target_accuracy),
        initial_accuracy=curve[0].accuracy if curve else None,
        final_accuracy=curve[-1].accuracy if curve else None,
        reference_accuracy=None if reference_accuracy is None else float(reference_accuracy),
        tolerance=cutoff.tolerance,
        train_samples=len(train_idx),
        replay_samples=n_replay,
        holdout_samples=len(holdout_idx),
        stratified_holdout=stratified,
        steps_per_epoch=epoch_batches,
        batch_size=recipe.batch_size,
        eval_every=every,
        max_steps=int(step_cap),
        curve=curve,
        mean_grad_norm=(tally.grad_total / steps) if steps else None,
        param_change=change,
        param_change_l2=change_l2,
        param_change_per_layer=per_layer,
        n_parameters=n_params,
        wall_time_s=tally.loop_end - t_zero,
        train_time_s=tally.train_s,
        eval_time_s=tally.eval_s,
        energy=energy,
        energy_error=energy_error,
        device=str(dev),
        seed=cfg.seed,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        error=error_text,
        stop_reason=tally.stop_reason if status in ("stopped", "stopped_by_budget") else None,
        recipe=cfg.to_dict()["recipe"] | {"replay_fraction": replay_fraction},
        holdout_indices=holdout_idx.tolist(),
        model=work.eval(),
    )
    if crash is not None:
        cost = f"{energy.energy_kwh:.3g} kWh" if energy is not None else "energy unknown"
        message = f"retraining stopped after {steps} steps ({error_text}); cost so far {cost}"
        if isinstance(crash, KeyboardInterrupt):
            raise RetrainInterrupted(message, result) from crash
        if isinstance(crash, FloatingPointError):
            message += "; lower the learning rate"
        raise RetrainError(message + ".", result) from crash
    if energy_error is not None and cfg.energy.require:
        raise EnergyMeasurementError(energy_error, partial=result)
    return result


def _train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """Training mode; with ``freeze_batchnorm`` the batch-norm layers keep their statistics."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


# --------------------------------------------------------------------------- probe


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
    try:
        shape = (int(spec.in_channels), int(spec.image_size), int(spec.image_size))
        num_classes = int(spec.num_classes)
        architecture = str(spec.architecture)
    except AttributeError as error:
        raise InputError(f"the model spec lacks {error.name}; pass a ModelSpec.") from error
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.rand((samples, *shape), generator=gen)
        y = torch.randint(0, num_classes, (samples,), generator=gen)
    else:
        _check_xy(x, y, "the probe data")
        if len(x) < samples:
            raise InputError(f"the probe data has {len(x)} samples but the probe needs {samples}; give more or lower samples.")
        x, y = x[:samples], y[:samples].long()
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

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.random.fork_rng(devices=_fork_rng_devices(dev)):
        torch.manual_seed(seed)
        for idx in _batches(samples, batch_size, gen)[:warmup_steps]:
            step(idx.to(dev))
        sync()
        options = {"country_iso_code": country_iso_code, "experiment_name": "probe", "measure_power_secs": 0.5}
        options.update(energy_options or {})
        meter = EnergyMeter(**options)
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
            sync()
            elapsed = time.perf_counter() - started
        finally:
            energy = meter.stop()
    per = trained  # sample-epochs actually trained (a trailing single sample is skipped)
    if dev.type == "cuda":
        hardware = f"cuda:{torch.cuda.get_device_name(dev)}"
    else:
        hardware = f"cpu:{energy.cpu_model or 'unknown'}"
    return ProbeResult(
        architecture=architecture,
        input_shape=shape,
        num_classes=num_classes,
        samples=samples,
        epochs=done_epochs,
        batch_size=batch_size,
        steps=steps,
        device=str(dev),
        hardware=hardware,
        joules_per_sample_epoch=energy.energy_joules / per,
        seconds_per_sample_epoch=elapsed / per,
        energy=energy,
    )
