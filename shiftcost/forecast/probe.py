"""The probe stage: a few fine-tuning steps on a throw-away copy, watched closely.

Before deciding, :func:`run_probe` fine-tunes a *copy* of the model for ``steps`` steps on
a small sample of the new batch and evaluates on the same held-out split the real retrain
would judge the cutoff on (same seed, same :mod:`~shiftcost.forecast.protocol`). It
records the held-out loss and accuracy after every step, the initial gradient norm, the
gradient noise scale and the loss drop per step, and what the probe itself cost: steps,
sample-gradients, samples evaluated, seconds and (when tracked) energy, so the caller can
charge it like any other spend. The idea is Ekya's micro-profiler (NSDI 2022), used here
for cost rather than accuracy.

The gradient noise scale is McCandlish et al.'s simple estimate ``B = tr(Sigma) / |G|^2``
from the first step's gradients: the step's batch is split into micro-batches whose
gradients give ``|G_small|^2`` and whose mean gives ``|G_big|^2`` (no extra backward pass).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.energy import HostEnergyRate
from shiftcost.forecast import protocol
from shiftcost.forecast.curve import epochs_to_target, fit_curve

__all__ = [
    "ProbeCost", "ProbeTrajectory", "run_probe", "probe_features", "saved_curve", "features_of_saved_curve", "starts_at_target", "PROBE_FEATURES", "PROBE_STRATUM",
]

# Probe length chosen on calibration data only (digits CNN, built-in kinds, leave-one-kind-out
# MdAPE of stage 1): 8 steps x 16 on 64 samples 79%, 16 x 16 on 128 73%, 16 x 16 on 256 53%,
# 32 x 16 on 256 54%, 24 x 8 on 192 82% (stage 0 alone: 72%). Checked again with the probe on the
# retrain's step clock and stage 1 on the curve alone (forecast_selection.py --seeds 3, digits CNN):
# 8 x 16 on 256 61% against 39% for 16 x 16, so halving the probe's cost is not worth its forecast.
# Halving it by the batch instead (16 x 8 on 256, same steps; forecast_selection.py --windows 3
# --noise-seeds 2 --seeds 2, both architectures, one run beside 16 x 16): 51% | 93% against
# 37% | 56%, C-index 0.75 | 0.60 against 0.88 | 0.86. On the step clock a probe that sees a
# retrain through costs a quarter of its sample-gradients (16 of the retrain's 64 per step).
# The same 256 sample-gradients in fewer, larger steps follow a retrain's first steps more closely
# but see less of its curve (the same command, one run beside 16 x 16 at 40% | 47%, C-index
# 0.90 | 0.84): 8 steps x 32 49% | 48% (0.88 | 0.77), 4 x 64 49% | 48% (0.85 | 0.83). Stopping
# the probe once its own evaluations meet the cutoff fits the curve to fewer points on the easy
# batches: 46% | 57% (0.89 | 0.84). Stage 1 now reads the cutoff the probe met, which stopping
# there leaves as it is, so probes stop (run_probe's stop_at_cutoff). Under that design, shorter
# probes read again from saved curves (forecast_selection.py --calibrations, 216 | 162 points, each
# kind left out): 8 steps 54% | 65%, 10 steps 48% | 60%, 12 steps 43% | 63%, against 32% | 47% for 16.
#: Features the probe adds to a forecast (besides the index model's prediction).
PROBE_FEATURES: tuple[str, ...] = (
    "curve_log_epochs", "probe_progress", "probe_loss_drop", "probe_gap", "cutoff_log_epochs", "probe_initial_gap", "probe_first_step_gain", "probe_bn_gain",
)
#: 1 where the probe's own evaluations met the cutoff after training, 0 where they never did (its
#: cutoff is the curve's extrapolated crossing): not a feature, the stratum of the probe stage's
#: interval where it is sized by stratum (:attr:`~shiftcost.forecast.forecaster.Forecaster.interval_sized_on`).
PROBE_STRATUM = "probe_met_cutoff"
DEFAULT_STEPS = 16
DEFAULT_BATCH_SIZE = 16
DEFAULT_SAMPLES = 256
#: The most held-out images a probe evaluates (a random part of the retrain's holdout where that
#: is larger). Its evaluations, one before its first step and one after each, are most of its
#: cost, and the retrain's holdout grows with the batch: uncapped, a probe on a batch of 6,000
#: costs 10,456 sample-gradient equivalents, 1.6 epochs of its retrain (6,600 an epoch), whatever
#: the retrain's length; capped, 3,157. Every forecast in benchmarks/ was calibrated and scored on
#: probes evaluating at most 162 images, so 512 reads each accuracy at least as precisely.
#: benchmarks/probe_holdout.py measures what the cap moves.
DEFAULT_MAX_HOLDOUT = 512
#: How the probe's learning rate follows its smaller batch (:data:`RATE_SCALINGS`). ``"none"``: the
#: retrain's rate, each probe step counted as a retrain step. ``"linear"`` (Goyal et al. 2017, for SGD)
#: and ``"sqrt"`` (Malladi et al. 2022, for Adam): the rate times ``share`` or ``sqrt(share)``,
#: ``share = batch_size / retrain_batch_size``, each step counted as ``share`` of a retrain's step, so
#: that four steps of 16 images stand for one of 64. At the retrain's own rate a step of 16 images is
#: mostly noise on some shifts: shufflenet_v2_x0_5's probe on `gaussian_noise` lost accuracy over all
#: 16 steps (0.815 to 0.710) where its retrain met the target (0.85) in 9. Compared on the built-in kinds
#: (forecast_selection.py --compare-probes, four sweeps per architecture, each kind left out), the
#: probe stage's MdAPE, digits CNN | shufflenet: none 35% | 61%, linear 47% | 40%, sqrt 47% | 36%; the
#: mean's CI against none reaches above zero for both ([-31.1, +8.5] and [-33.4, +5.0] points), so
#: "none" stays (benchmarks/README.md, "The probe's rate scaled with its batch").
RATE_SCALING = "none"
RATE_SCALINGS: dict[str, Callable[[float], float]] = {"none": lambda share: 1.0, "linear": lambda share: share, "sqrt": math.sqrt}
#: The scaling rule each of the recipe's optimizers was derived for.
SCALING_RULES = {"sgd": "linear", "adam": "sqrt", "adamw": "sqrt"}
#: Whether calibration probes every point under :data:`RATE_SCALING` and under the rule for its
#: recipe's optimizer, and keeps the probe whose stage forecasts the sweep's own kinds better, each
#: left out (``shiftcost.calibrate.analysis.choose_rate_scaling``). No one scaling suits both
#: architectures above, but this choice did not pass the rule either: each sweep fitted on its own
#: other kinds, as calibrate fits it (forecast_selection.py --each-sweep, four sweeps per architecture
#: on a 2-core AMD EPYC), the probe stage's MdAPE went from 32% | 56% to 34% | 36%, the mean's CI
#: [-20.3, +2.2] points, and on four fresh sweeps from 43% | 53% to 46% | 51%, [-18.9, +8.0]
#: (benchmarks/README.md, "The probe's rate chosen per model").
CHOOSE_RATE_SCALING = False


def calibration_scalings(optimizer: str) -> tuple[str, ...]:
    """The rate scalings a calibration sweep runs its probes under, :data:`RATE_SCALING` first."""
    if not CHOOSE_RATE_SCALING:
        return (RATE_SCALING,)
    return tuple(dict.fromkeys((RATE_SCALING, SCALING_RULES.get(optimizer, RATE_SCALING))))


#: Micro-batches the probe's first step is taken in (its gradient summed over them; the gradient noise
#: scale is read from their spread). A model with batch norm normalises each micro-batch by its own
#: statistics and updates its running statistics once per micro-batch, so that first step is not the
#: one a batch of 16 would take: on shufflenet_v2_x0_5 the probe's held-out accuracy falls after it on
#: six of the nine built-in kinds (median), where every retrain's rises after its first step. An
#: ordinary first step (1) removed the fall but forecast worse, compared on the built-in kinds
#: (``forecast_selection.py --compare-probes``, four sweeps per architecture, 216 points each, each kind
#: left out, a 2-core Intel Xeon): the probe stage's MdAPE 25% | 54% with 4 against 39% | 67% with 1,
#: the CI of the mean's difference [-1.7, +33.6] points; so 4 stays (benchmarks/README.md, "The probe's
#: first step taken whole").
MICRO_BATCHES = 4
#: Whether a probe that took a step also reads the model's held-out accuracy with its batch-norm statistics
#: estimated afresh on the probe's sample, no gradient (:attr:`ProbeTrajectory.bn_adapted_accuracy`, stage 1's
#: ``probe_bn_gain``): one more pass over the sample and the holdout. Beside the cutoff it forecast worse on
#: the built-in kinds (forecast_selection.py --calibrations, eight sweeps, 216 points per architecture, each
#: kind left out, a 2-core AMD EPYC): the probe stage's MdAPE 52% | 99% against 35% | 61%, the CI of the mean's
#: difference [+5.3, +47.1] points (benchmarks/README.md, "The probe's batch-norm statistics"); so it is off.
BN_READING = False
#: Whether the probe's batch-norm running statistics are the plain average over its batches (PyTorch's
#: ``momentum=None``, the count reset) rather than the recipe's exponential average, whose few updates on
#: batches of 16 (and the first step's micro-batches of 4) leave them noisy. After the first step it holds
#: only that step's 16 images, and shufflenet_v2_x0_5's accuracy falls further there; compared on the built-in
#: kinds (forecast_selection.py --compare-probes, eight sweeps, a 2-core AMD EPYC): the probe stage's MdAPE
#: 59% | 66% against 35% | 61%, the CI of the mean's difference [-7.2, +28.8] points; so it is off.
BN_RUNNING_AVERAGE = False
#: Horizon (in multiples of the epoch cap) at which a curve that never crosses is clipped. Where the
#: curve feature is clipped was compared by ``benchmarks/forecast_selection.py --windows 3 --noise-seeds 2
#: --seeds 4`` (216 points per architecture, each kind left out; MdAPE of epochs, digits CNN |
#: shufflenet_v2_x0_5): 1 cap 49% | 77%, 1.5 caps 47% | 68%, 2 caps 44% | 62%, 3 caps 44% | 59%. Once
#: stage 1 held the curve at slope 1, one run with ``--seeds 2`` (108 points) gave 1 cap 36% | 59%,
#: 1.5 caps 36% | 60%, 2 caps 35% | 54%, 3 caps 36% | 56%: 2 caps ahead by a point or two, where the
#: larger run had 3 caps ahead on shufflenet; within the runs' noise, so 3 is kept. Once stage 1 read the
#: probe's own cutoff (whose value, where the probe never met the cutoff, is the clipped curve's crossing),
#: ``forecast_selection.py --calibrations`` over four digits CNN and three shufflenet sweeps (216 and 162
#: points) gave 1 cap 38% | 65%, 1.5 caps 40% | 54%, 2 caps 38% | 51%, 3 caps 35% | 49%.
HORIZON_CAPS = 3.0


def horizon_epochs(cap_epochs: float) -> float:
    """The most epochs a forecast says for a calibration capped at ``cap_epochs``."""
    return HORIZON_CAPS * cap_epochs


@dataclass(frozen=True)
class ProbeCost:
    """What the probe spent: charge it to the ledger like a retrain."""

    steps: int
    sample_gradients: int
    samples_evaluated: int
    seconds: float
    energy_kwh: float | None
    energy_measured: bool
    #: The host rate's estimate of the same spend (``None`` without a rate): beside a
    #: measured ``energy_kwh`` it shows how far the estimate charged in a forecast is off.
    estimated_energy_kwh: float | None = None
    #: Why CodeCarbon gave no figure when asked to measure (the estimate then stands in).
    energy_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeTrajectory:
    """Held-out accuracy and loss after 0..steps probe steps (fewer where the probe stopped at the
    cutoff), with gradient statistics.

    ``epochs`` are the *real* retrain's epochs counted in optimizer steps (probe steps
    divided by the retrain's steps per epoch), so the probe's curve and a retrain's curve
    share one time axis. Steps, not samples: with an adaptive optimizer at a fixed learning
    rate, a step on the probe's small batch moves the model about as far as a step on the
    retrain's batch, so counting samples would place the probe's progress several times too
    early on the retrain's clock (a probe whose rate follows its batch, ``rate_scaling``, is on the
    sample clock instead). The steps per epoch are those of the new images' training
    split: a retrain that replays reference images takes more steps an epoch, a constant factor
    that stage 1's fit absorbs (placed on the replaying pool's clock instead, the digits CNN's
    probe stage scored 51% against 50% in ``forecast_selection.py --replay-fraction 0.5 --seeds 2``).
    """

    epochs: list[float]
    accuracy: list[float]
    loss: list[float]
    #: ``None`` for a probe that stopped before its first step (its batch already met the cutoff).
    initial_grad_norm: float | None
    grad_noise_scale: float | None
    loss_drop_per_step: float
    target_accuracy: float
    ceiling: float
    pool_samples: int
    holdout_samples: int
    cost: ProbeCost
    settings: dict[str, Any] = field(default_factory=dict)
    #: Held-out accuracy of the model before any step with its batch-norm statistics estimated afresh on the
    #: probe's sample (no gradient); ``None`` without batch norm or where the probe took no step.
    bn_adapted_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost"] = self.cost.to_dict()
        return _finite_or_none(out)


def starts_at_target(accuracy: list[float], target: float) -> bool:
    """Whether a trajectory's first evaluation already meets the target: the retrain, judged on
    the same held-out split, stops there. Calibration rows, their curve feature and forecasts
    all decide "no training needed" through this one rule."""
    return accuracy[0] >= target


def probe_features(
    epochs: list[float],
    accuracy: list[float],
    loss: list[float],
    *,
    target: float,
    ceiling: float,
    cap_epochs: float,
    horizon_caps: float | None = None,
    bn_adapted_accuracy: float | None = None,
) -> dict[str, float]:
    """The probe's (or a run's first evaluations') view of how learnable the shift is.

    ``curve_log_epochs``: log1p of the learning curve's epochs to the target, clipped at
    ``HORIZON_CAPS`` caps, and 0 where the first evaluation already meets the target;
    ``probe_progress``: share of the way from the first to the target accuracy covered by
    the mean of the last three evaluations (clipped to [-1, 2]);
    ``probe_loss_drop``: relative drop of held-out loss from the first to the mean of the
    last three evaluations; ``probe_gap``: how far that mean of the last three accuracies
    still lies below the target (negative once past it). The gap stays informative where
    the curve does not: a probe that ends just under the target on a flat curve has no
    finite crossing, yet its retrain often needs little. ``cutoff_log_epochs``: log1p of the
    epochs at which the probe's own evaluations first met the cutoff rule
    (:func:`~shiftcost.forecast.protocol.cutoff_reached`), a measured crossing rather than an
    extrapolated one; where they never did, the curve's crossing, but no less than the probe's
    length. ``probe_met_cutoff`` (:data:`PROBE_STRATUM`) says which of the two the cutoff is.
    ``probe_initial_gap``: how far the first evaluation (the model before any step) lies below
    the target. ``probe_first_step_gain``: how far the first step moved the held-out accuracy
    (0 for a probe that took none), much of it, on a model with batch norm, the first step's
    re-estimate of its running statistics (:data:`MICRO_BATCHES`). ``probe_bn_gain``: how far
    ``bn_adapted_accuracy`` (:attr:`ProbeTrajectory.bn_adapted_accuracy`) lies above the first evaluation,
    the part of the shift new statistics alone undo (0 where there is no such reading).
    """
    fit = fit_curve(epochs, accuracy, ceiling)
    horizon = (HORIZON_CAPS if horizon_caps is None else horizon_caps) * cap_epochs
    # A trajectory that starts at the target has crossed at t = 0: its retrain stops at its first
    # evaluation. Fitted through the dip the probe's first steps often make, the curve put such
    # batches at the horizon, and calibration's zero-cost rows then pulled stage 1's weight on the
    # curve towards zero (shufflenet_v2_x0_5 in forecast_accuracy.py: 0.0, and 1.04 with them at 0).
    crossing = 0.0 if starts_at_target(accuracy, target) else min(epochs_to_target(fit, target), horizon)
    tail = max(1, min(3, len(accuracy) - 1))
    first_acc, last_acc = accuracy[0], float(np.mean(accuracy[-tail:]))
    gap = target - first_acc
    progress = 1.0 if gap <= 0 else float(np.clip((last_acc - first_acc) / gap, -1.0, 2.0))
    first_loss, last_loss = loss[0], float(np.mean(loss[-tail:]))
    drop = (first_loss - last_loss) / first_loss if first_loss > 0 else 0.0
    met = protocol.first_cutoff(accuracy, target)
    cutoff = epochs[met] if met is not None else max(crossing, epochs[-1])
    return {
        "curve_log_epochs": math.log1p(crossing), "probe_progress": progress, "probe_loss_drop": float(drop),
        "probe_gap": float(target - last_acc), "cutoff_log_epochs": math.log1p(cutoff), "probe_initial_gap": float(gap),
        "probe_first_step_gain": float(accuracy[1] - first_acc) if len(accuracy) > 1 else 0.0,
        "probe_bn_gain": 0.0 if bn_adapted_accuracy is None else float(bn_adapted_accuracy - first_acc), PROBE_STRATUM: float(met is not None and met > 0),
    }


def saved_curve(epochs: list[float], accuracy: list[float], loss: list[float]) -> list[dict[str, float]]:
    """A probe's evaluations as calibration rows and benchmark outputs keep them (``probe_curve``)."""
    return [{"epoch": e, "accuracy": a, "loss": value} for e, a, value in zip(epochs, accuracy, loss)]


def features_of_saved_curve(
    curve: list[dict[str, float]], *, target: float, ceiling: float, cap_epochs: float, horizon_caps: float | None = None,
    bn_adapted_accuracy: float | None = None,
) -> dict[str, float]:
    """:func:`probe_features` of a :func:`saved_curve`: a saved calibration's probes read again."""
    return probe_features(
        [p["epoch"] for p in curve], [p["accuracy"] for p in curve], [p["loss"] for p in curve],
        target=target, ceiling=ceiling, cap_epochs=cap_epochs, horizon_caps=horizon_caps, bn_adapted_accuracy=bn_adapted_accuracy,
    )


@dataclass
class _Walk:
    """What the probe's steps recorded (the trajectory before it is frozen)."""

    epochs: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seen: int = 0
    steps: int = 0
    evaluated: int = 0
    grad_norm0: float | None = None
    noise_scale: float | None = None


def run_probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target_accuracy: float,
    ceiling: float,
    steps: int = DEFAULT_STEPS,
    samples: int = DEFAULT_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    holdout_fraction: float = protocol.HOLDOUT_FRACTION,
    min_holdout: int = 10,
    seed: int = 0,
    device: str | torch.device = "auto",
    track_energy: bool = False,
    country_iso_code: str = "USA",
    energy_options: dict[str, Any] | None = None,
    energy_rate: HostEnergyRate | None = None,
    source: str = "the batch",
    retrain_batch_size: int | None = None,
    stop_at_cutoff: bool = True,
    max_holdout: int | None = None,
    rate_scaling: str = RATE_SCALING,
) -> ProbeTrajectory:
    """Fine-tune a copy of ``model`` for up to ``steps`` steps on ``samples`` training samples.

    The caller's model and the global random state are untouched. With ``track_energy``
    the probe is measured with CodeCarbon (as retrains are; when CodeCarbon cannot measure,
    ``cost.energy_error`` says why and the estimate stands in); with ``energy_rate``
    (the host's :class:`~shiftcost.energy.HostEnergyRate`, the probe counted as one measured
    run) it is also estimated, and the
    estimate stands in when nothing is measured. The probe's cost is at most ``steps`` steps of
    ``batch_size`` and ``steps + 1`` evaluations of the holdout, whatever the retrain's length.
    ``retrain_batch_size`` is the real retrain's batch size (default: the recipe's): it sets
    the steps per epoch that put the probe's steps on the retrain's time axis. With
    ``stop_at_cutoff`` the probe stops at its first evaluation that meets the retrains' cutoff
    rule (:func:`~shiftcost.forecast.protocol.cutoff_reached` on ``target_accuracy``), before
    any step where the first one already does: the crossing stage 1 reads is then measured,
    and later steps would only have cost. ``lr``,
    ``optimizer``, ``weight_decay`` and ``momentum`` are the retrain recipe's
    (:class:`~shiftcost.recipe.Recipe`). Batch-norm statistics follow the probe's batches even
    where the recipe freezes them in retrains (see ``_walk``). ``max_holdout`` caps the
    held-out images each evaluation reads (a seeded random part of the retrain's holdout; ``None``:
    all of it, as probes calibrated before the cap did). ``rate_scaling`` (:data:`RATE_SCALING`) says
    how the probe's rate and clock follow its batch against the retrain's.
    """
    from shiftcost.errors import ConfigError
    from shiftcost.recipe import Recipe
    from shiftcost.retrain import _check_logits, _check_xy, _holdout_split, _make_optimizer, _trainable, resolve_device

    if rate_scaling not in RATE_SCALINGS:
        raise ConfigError(f"the probe's rate scaling must be one of {', '.join(RATE_SCALINGS)}, got {rate_scaling!r}.")
    if steps < 1 or samples < 2 or batch_size < 2 or (max_holdout is not None and max_holdout < 2):
        raise ConfigError(
            f"the probe needs steps >= 1, samples >= 2, batch_size >= 2 and max_holdout >= 2 (or none), "
            f"got {steps}, {samples}, {batch_size}, {max_holdout}."
        )
    _check_xy(x, y, source)
    dev = resolve_device(device)
    work = copy.deepcopy(model).to(dev)
    params = _trainable(work)
    if not params:
        from shiftcost.errors import InputError

        raise InputError("the model has no trainable parameters; nothing to probe.")
    _check_logits(work, x, y, dev, source)
    train_idx, hold_idx, _ = _holdout_split(y, holdout_fraction, seed, min_holdout, source)
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 7))[: min(samples, len(train_idx))]
    train = (x[train_idx[pick]], y[train_idx[pick]].long())
    if max_holdout is not None and len(hold_idx) > max_holdout:
        hold_idx = hold_idx[torch.randperm(len(hold_idx), generator=torch.Generator().manual_seed(seed + 11))[:max_holdout]]
    hold = (x[hold_idx], y[hold_idx].long())
    batch = min(batch_size, len(train[0]))
    retrain_batch_size = retrain_batch_size or Recipe().batch_size
    ratio = batch / retrain_batch_size
    scaled_lr = lr * RATE_SCALINGS[rate_scaling](ratio)
    optim = _make_optimizer(Recipe(optimizer=optimizer, lr=scaled_lr, weight_decay=weight_decay, momentum=momentum), [p for _, p in params])
    per_epoch = protocol.steps_per_epoch(len(train_idx), retrain_batch_size) / (1.0 if rate_scaling == "none" else ratio)
    meter, energy_error = _start_meter(track_energy, country_iso_code, energy_options, dev)
    started = time.perf_counter()
    try:
        walk = _walk(work, params, optim, train, hold, per_epoch, steps, batch, seed, dev, target_accuracy if stop_at_cutoff else None)
        bn_adapted = _bn_adapted_accuracy(model, train[0], hold, dev) if BN_READING and walk.steps else None
        if bn_adapted is not None:
            walk.evaluated += len(train[0]) + len(hold[0])
    finally:
        seconds = time.perf_counter() - started
        energy, stop_error = _stop_meter(meter)
    estimated = None if energy_rate is None else energy_rate.kwh(walk.seen, walk.evaluated)
    kwh = energy.energy_kwh if energy is not None else estimated
    slope = float(np.polyfit(np.arange(len(walk.loss)), walk.loss, 1)[0]) if len(walk.loss) > 1 else 0.0
    cost = ProbeCost(walk.steps, walk.seen, walk.evaluated, seconds, kwh, energy is not None, estimated, energy_error or stop_error)
    return ProbeTrajectory(
        epochs=walk.epochs, accuracy=walk.accuracy, loss=walk.loss, initial_grad_norm=walk.grad_norm0,
        grad_noise_scale=walk.noise_scale, loss_drop_per_step=-slope, target_accuracy=float(target_accuracy),
        ceiling=float(ceiling), pool_samples=len(train_idx), holdout_samples=len(hold_idx), cost=cost,
        settings={
            "steps": steps, "samples": len(train[0]), "batch_size": batch, "lr": lr, "optimizer": optimizer, "seed": seed,
            "weight_decay": weight_decay, "momentum": momentum,
            "retrain_batch_size": retrain_batch_size, "stop_at_cutoff": stop_at_cutoff, "max_holdout": max_holdout,
            "rate_scaling": rate_scaling, "bn_reading": BN_READING,
        },
        bn_adapted_accuracy=bn_adapted,
    )


def _start_meter(track: bool, country_iso_code: str, options: dict[str, Any] | None, dev: torch.device) -> tuple[Any, str | None]:
    """A started CodeCarbon meter, or why there is none: a probe is not worth failing over its meter."""
    if not track:
        return None, None
    from shiftcost.energy import EnergyMeasurementError, EnergyMeter, options_for_device

    try:
        chosen = options_for_device({"country_iso_code": country_iso_code, "experiment_name": "probe"} | dict(options or {}), dev.type)
        return EnergyMeter(**chosen).start(), None
    except EnergyMeasurementError as error:
        return None, str(error)


def _stop_meter(meter: Any) -> tuple[Any, str | None]:
    if meter is None:
        return None, None
    from shiftcost.energy import EnergyMeasurementError

    try:
        return meter.stop(), None
    except EnergyMeasurementError as error:
        return None, str(error)


def _walk(
    work: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    optim: torch.optim.Optimizer,
    train: tuple[torch.Tensor, torch.Tensor],
    hold: tuple[torch.Tensor, torch.Tensor],
    retrain_steps_per_epoch: float,
    steps: int,
    batch: int,
    seed: int,
    dev: torch.device,
    stop_at: float | None,
) -> _Walk:
    """The probe's steps, with a held-out evaluation before the first and after every one, until
    the evaluations meet the cutoff rule on ``stop_at`` (never stopping early when it is ``None``)."""
    from shiftcost.retrain import _evaluate, _seeded

    x_train, y_train = train
    shuffle = torch.Generator().manual_seed(seed)
    walk = _Walk()

    def evaluate_and_stop() -> bool:
        acc, loss = _evaluate(work, *hold, dev, 512)
        walk.accuracy.append(acc), walk.loss.append(loss), walk.epochs.append(walk.steps / retrain_steps_per_epoch)
        walk.evaluated += len(hold[0])
        return stop_at is not None and protocol.cutoff_reached(walk.accuracy, stop_at)

    with _seeded(seed, dev):
        # Batch-norm statistics follow the probe's batches even where the recipe keeps them frozen
        # in retrains: how much re-estimated statistics recover says how hard the shift is. On the
        # built-in kinds with the retrains' statistics frozen (forecast_selection.py --windows 3
        # --noise-seeds 2 --seeds 2, two probes side by side), stage 1's leave-one-kind-out MdAPE /
        # C-index, digits CNN | shufflenet_v2_x0_5: following 52% / 0.92 | 50% / 0.86, frozen like
        # the retrains 50% / 0.89 | 97% / 0.75.
        work.train()
        if BN_RUNNING_AVERAGE:
            for norm in _batch_norms(work):
                norm.momentum = None
                norm.num_batches_tracked.zero_()
        order = torch.randperm(len(x_train), generator=shuffle)
        if evaluate_and_stop():
            return walk
        cursor = 0
        for step in range(steps):
            if cursor + batch > len(order):
                order, cursor = torch.randperm(len(x_train), generator=shuffle), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            xb, yb = x_train[idx].to(dev), y_train[idx].to(dev)
            optim.zero_grad(set_to_none=True)
            if step == 0:
                walk.grad_norm0, walk.noise_scale, _ = _first_step_gradients(work, params, xb, yb)
            else:
                F.cross_entropy(work(xb), yb).backward()
            optim.step()
            walk.seen += len(idx)
            walk.steps += 1
            if evaluate_and_stop():
                break
    return walk


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _bn_adapted_accuracy(model: nn.Module, x_train: torch.Tensor, hold: tuple[torch.Tensor, torch.Tensor], dev: torch.device) -> float | None:
    """Held-out accuracy of ``model`` with its batch-norm statistics estimated afresh on ``x_train``
    (their plain average over batches of 64, no gradient, nothing else in training mode); ``None``
    for a model without batch norm."""
    from shiftcost.retrain import _evaluate

    adapted = copy.deepcopy(model).to(dev).eval()
    norms = _batch_norms(adapted)
    if not norms:
        return None
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for chunk in x_train.split(64):
            adapted(chunk.to(dev))
    adapted.eval()
    return _evaluate(adapted, *hold, dev, 512)[0]


def _first_step_gradients(
    work: nn.Module, params: list[tuple[str, nn.Parameter]], xb: torch.Tensor, yb: torch.Tensor
) -> tuple[float, float | None, float]:
    """Accumulate the step's gradient micro-batch by micro-batch; return (|G_big|, noise scale, loss).

    Without batch norm the accumulated gradient equals the full batch's (weighted by micro-batch
    size), so the step taken is the ordinary one; with it, see :data:`MICRO_BATCHES`.
    """
    chunks = [c for c in torch.arange(len(xb)).chunk(MICRO_BATCHES) if len(c) >= 1]
    small_sq: list[float] = []
    total_loss = 0.0
    for chunk in chunks:
        before = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in params]
        loss = F.cross_entropy(work(xb[chunk]), yb[chunk]) * (len(chunk) / len(xb))
        loss.backward()
        total_loss += float(loss.detach())
        sq = 0.0
        for (_, p), b in zip(params, before):
            if p.grad is not None:
                g = (p.grad.detach() - b) * (len(xb) / len(chunk))  # this micro-batch's own mean gradient
                sq += float(g.double().square().sum())
        small_sq.append(sq)
    big_sq = sum(float(p.grad.detach().double().square().sum()) for _, p in params if p.grad is not None)
    b_small = len(xb) / len(chunks)
    b_big = float(len(xb))
    mean_small = float(np.mean(small_sq))
    noise: float | None = None
    if len(chunks) > 1 and b_big > b_small:
        true_sq = (b_big * big_sq - b_small * mean_small) / (b_big - b_small)
        trace = (mean_small - big_sq) / (1.0 / b_small - 1.0 / b_big)
        noise = float(trace / true_sq) if true_sq > 0 else None
    return math.sqrt(big_sq), noise, total_loss


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value
