"""The fine-tuning run behind every retraining: train, evaluate, stop at the cutoff or a cap."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.energy import EnergyMeasurement, EnergyMeasurementError, EnergyMeter, options_for_device
from shiftcost.errors import ConfigError, InputError
from shiftcost.forecast.protocol import check_above_chance
from shiftcost.forecast.protocol import cutoff_reached as protocol_cutoff_reached
from shiftcost.index.capture import resolve_device
from shiftcost.recipe import Recipe, RetrainConfig, build_augmentation, load_entry_point, pool_samples
from shiftcost.retrain.results import EvalPoint, RetrainError, RetrainInterrupted, RetrainResult
from shiftcost.retrain.training import (
    _batches, _check_logits, _check_xy, _evaluate, _holdout_split, _make_optimizer, _make_schedule,
    _param_change, _seeded, _train_mode, _trainable,
)

#: What a ``progress`` callback may return: ``None`` to go on, or a sentence saying why
#: the run must stop now (for example a budget guard); the run then ends with status
#: ``"stopped"`` and the sentence in :attr:`RetrainResult.stop_reason`.
ProgressCallback = Callable[[EvalPoint, int, float], "str | None"]


def _stopped_status(reason: str) -> str:
    """A budget guard's stop keeps its own status; any other callback's reason is "stopped"."""
    return "stopped_by_budget" if reason == "stopped_by_budget" else "stopped"


@dataclass
class _Tally:
    """Counters of one run, kept by the training steps and read by the evaluations."""

    step: int = 0
    samples: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    grad_sum: float = 0.0
    grad_steps: int = 0
    grad_total: float = 0.0
    loop_end: float | None = None
    stop_reason: str | None = None


@dataclass
class _Pool:
    """The data of one run: the training pool (new training split plus replay) and the holdout."""

    x: torch.Tensor
    y: torch.Tensor
    x_hold: torch.Tensor
    y_hold: torch.Tensor
    train_idx: torch.Tensor
    holdout_idx: torch.Tensor
    stratified: bool
    n_replay: int

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class _Schedule:
    """When to evaluate and when to give up, in optimizer steps."""

    epoch_batches: int
    step_cap: int
    every: int


@dataclass
class _Measured:
    """How the measured part of a run ended."""

    status: str = "failed"
    crash: BaseException | None = None
    error_text: str | None = None
    energy: EnergyMeasurement | None = None
    energy_error: str | None = None


class _CutoffRun:
    """One fine-tuning run of ``work`` on ``pool``: training steps, evaluations, the stop rule."""

    def __init__(
        self,
        work: nn.Module,
        params: list[tuple[str, nn.Parameter]],
        pool: _Pool,
        plan: _Schedule,
        cfg: RetrainConfig,
        dev: torch.device,
        target_accuracy: float,
        progress: ProgressCallback | None,
        augmentation: Callable[[torch.Tensor], torch.Tensor] | None,
        train_step: Callable[..., torch.Tensor] | None,
    ) -> None:
        recipe = cfg.recipe
        self.work, self.params, self.pool, self.plan, self.cfg, self.dev = work, params, pool, plan, cfg, dev
        self.target_accuracy = target_accuracy
        self.progress = progress
        self.augmentation, self.train_step = augmentation, train_step
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.start_params = {name: p.detach().double().cpu().clone() for name, p in params}
        self.optim = _make_optimizer(recipe, [p for _, p in params])
        self.schedule = _make_schedule(recipe, self.optim, plan.step_cap, plan.epoch_batches)
        self.curve: list[EvalPoint] = []
        self.tally = _Tally()
        self.t_zero = time.perf_counter()

    def evaluate(self) -> EvalPoint:
        """Held-out accuracy now; the progress callback may ask to stop."""
        tally, cutoff = self.tally, self.cfg.cutoff
        t = time.perf_counter()
        acc, loss = _evaluate(self.work, self.pool.x_hold, self.pool.y_hold, self.dev, cutoff.eval_batch_size)
        _train_mode(self.work, self.cfg.recipe.freeze_batchnorm)
        tally.eval_s += time.perf_counter() - t
        grad = tally.grad_sum / tally.grad_steps if tally.grad_steps else None
        tally.grad_sum, tally.grad_steps = 0.0, 0
        point = EvalPoint(
            step=tally.step,
            epoch=tally.samples / len(self.pool),
            samples_seen=tally.samples,
            accuracy=acc,
            loss=loss,
            grad_norm=grad,
            elapsed_s=time.perf_counter() - self.t_zero,
        )
        self.curve.append(point)
        if self.progress is not None:
            reason = self.progress(point, self.plan.step_cap, self.target_accuracy)
            if reason:
                tally.stop_reason = str(reason)
        return point

    def _loss(self, idx: torch.Tensor) -> torch.Tensor:
        xb = self.pool.x[idx]
        if self.augmentation is not None:
            xb = torch.stack([self.augmentation(image) for image in xb])
        xb = xb.to(self.dev, non_blocking=True)
        yb = self.pool.y[idx].to(self.dev, non_blocking=True)
        self.optim.zero_grad(set_to_none=True)
        loss = self.train_step(self.work, xb, yb) if self.train_step is not None else F.cross_entropy(self.work(xb), yb)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"the training step must return the scalar loss tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {self.tally.step + 1}")
        return loss

    def train_on(self, idx: torch.Tensor) -> None:
        """One optimizer step on the pool samples ``idx``."""
        t = time.perf_counter()
        self._loss(idx).backward()
        grads = [p.grad.detach() for _, p in self.params if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        self.optim.step()
        if self.schedule is not None:
            self.schedule.step()
        tally = self.tally
        tally.step += 1
        tally.samples += len(idx)
        tally.grad_sum += grad_norm
        tally.grad_total += grad_norm
        tally.grad_steps += 1
        tally.train_s += time.perf_counter() - t

    def evaluate_and_check_cutoff(self) -> bool:
        """Evaluate now; whether the run has reached the cutoff under the one rule of every
        retrain (:func:`shiftcost.forecast.protocol.cutoff_reached`) over all its evaluations."""
        self.evaluate()
        return protocol_cutoff_reached(self.curve, self.target_accuracy)

    def _due_for_evaluation(self) -> bool:
        return self.tally.step % self.plan.every == 0 or self.tally.step >= self.plan.step_cap

    def run(self) -> str:
        """Train until the cutoff, a stop request or the cap; the run's status."""
        if self.evaluate_and_check_cutoff():
            return "already_met"
        if self.tally.stop_reason:
            return _stopped_status(self.tally.stop_reason)
        while True:
            for idx in _batches(len(self.pool), self.cfg.recipe.batch_size, self.shuffle_gen):
                self.train_on(idx)
                if not self._due_for_evaluation():
                    continue
                if self.evaluate_and_check_cutoff():
                    return "reached"
                if self.tally.stop_reason:
                    return _stopped_status(self.tally.stop_reason)
                if self.tally.step >= self.plan.step_cap:
                    return "cap_reached"

    def run_measured(self) -> _Measured:
        """:meth:`run` under the energy meter, in a forked random state; a crash is kept, not raised."""
        measured = _Measured()
        meter = _start_meter(self.cfg, self.dev)
        tally = self.tally
        try:
            self.t_zero = time.perf_counter()
            with _seeded(self.cfg.seed, self.dev):  # dropout, augmentation and other randomness
                _train_mode(self.work, self.cfg.recipe.freeze_batchnorm)
                measured.status = self.run()
        except BaseException as exc:  # noqa: BLE001 - every failure must keep its partial cost
            tally.loop_end = time.perf_counter()
            measured.status = "failed"
            measured.crash = exc
            measured.error_text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # Ctrl-C has no message
        finally:
            if tally.loop_end is None:
                tally.loop_end = time.perf_counter()
            if meter is not None:
                try:
                    measured.energy = meter.stop()
                except EnergyMeasurementError as exc:
                    measured.energy_error = str(exc)
        return measured


def _start_meter(cfg: RetrainConfig, dev: torch.device) -> EnergyMeter | None:
    if not cfg.energy.track:
        return None
    options = {"country_iso_code": cfg.energy.country_iso_code, "experiment_name": "retrain"}
    options.update(cfg.energy.options or {})
    meter = EnergyMeter(**options_for_device(options, dev.type))
    meter.start()  # fails here, before any compute is spent, if CodeCarbon cannot start
    return meter


def _check_reference(
    x: torch.Tensor, reference_x: Any, reference_y: Any, recipe: Recipe, target_accuracy: float | None,
    reference_accuracy: float | None, source: str,
) -> float:
    """Check the reference data against the batch; the share of each epoch's pool replayed from it."""
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
    return replay_fraction


def _resolve_target(
    work: nn.Module, dev: torch.device, cfg: RetrainConfig, reference_x: Any, reference_y: Any,
    target_accuracy: float | None, reference_accuracy: float | None, num_classes: int,
) -> tuple[float, float | None]:
    """(target accuracy, reference accuracy): as given, else measured on the reference data.

    A target taken from a reference accuracy no better than chance is refused: such a model
    meets it at once, and the run would be recorded as ``already_met``.
    """
    if target_accuracy is None:
        if reference_accuracy is None:
            if reference_x is None:
                raise InputError(
                    "no target accuracy: pass target_accuracy, reference_accuracy or labelled reference data."
                )
            _check_logits(work, reference_x, reference_y, dev, "the reference data")
            reference_accuracy, _ = _evaluate(work, reference_x, reference_y, dev, cfg.cutoff.eval_batch_size)
        check_above_chance(reference_accuracy, num_classes, cfg.cutoff.tolerance, "the reference")
        target_accuracy = max(0.0, reference_accuracy - cfg.cutoff.tolerance)
    if not 0.0 <= target_accuracy <= 1.0:
        raise ConfigError(f"target accuracy must lie in [0, 1], got {target_accuracy!r}.")
    return target_accuracy, reference_accuracy


def _build_pool(
    x: torch.Tensor, y: torch.Tensor, reference_x: Any, reference_y: Any, cfg: RetrainConfig,
    replay_fraction: float, source: str,
) -> _Pool:
    """Holdout split of the new data, plus the replayed reference samples in the training pool."""
    cutoff = cfg.cutoff
    split_seed = cfg.seed if cutoff.holdout_seed is None else cutoff.holdout_seed
    train_idx, holdout_idx, stratified = _holdout_split(y, cutoff.holdout_fraction, split_seed, cutoff.min_holdout, source)
    x_pool, y_pool = x[train_idx], y[train_idx].long()
    n_replay = 0
    if replay_fraction > 0:
        n_replay = pool_samples(len(train_idx), replay_fraction, len(reference_x)) - len(train_idx)
        replay_gen = torch.Generator().manual_seed(cfg.seed + 1)
        chosen = torch.randperm(len(reference_x), generator=replay_gen)[:n_replay]
        x_pool = torch.cat([x_pool, reference_x[chosen].to(x_pool.dtype)])
        y_pool = torch.cat([y_pool, reference_y[chosen].long()])
    return _Pool(
        x=x_pool, y=y_pool, x_hold=x[holdout_idx], y_hold=y[holdout_idx].long(), train_idx=train_idx,
        holdout_idx=holdout_idx, stratified=stratified, n_replay=n_replay,
    )


def _plan(cfg: RetrainConfig, n_pool: int) -> _Schedule:
    epoch_batches = len(_batches(n_pool, cfg.recipe.batch_size, torch.Generator().manual_seed(cfg.seed)))
    step_cap = cfg.caps.max_steps if cfg.caps.max_steps is not None else 10**12
    if cfg.caps.max_epochs is not None:
        step_cap = min(step_cap, max(1, int(math.ceil(cfg.caps.max_epochs * epoch_batches))))
    every = cfg.cutoff.eval_every if cfg.cutoff.eval_every is not None else max(1, epoch_batches // 4)
    return _Schedule(epoch_batches=epoch_batches, step_cap=step_cap, every=every)


def _result(
    run: _CutoffRun, measured: _Measured, reference_accuracy: float | None, replay_fraction: float
) -> RetrainResult:
    cfg, tally, pool, curve, status = run.cfg, run.tally, run.pool, run.curve, measured.status
    recipe = cfg.recipe
    change, change_l2, per_layer, n_params = _param_change(run.start_params, run.work)
    steps = tally.step
    return RetrainResult(
        status=status,
        reached_cutoff=status in ("reached", "already_met"),
        steps=steps,
        epochs=tally.samples / len(pool),
        samples_seen=tally.samples,
        target_accuracy=float(run.target_accuracy),
        initial_accuracy=curve[0].accuracy if curve else None,
        final_accuracy=curve[-1].accuracy if curve else None,
        reference_accuracy=None if reference_accuracy is None else float(reference_accuracy),
        tolerance=cfg.cutoff.tolerance,
        train_samples=len(pool.train_idx),
        replay_samples=pool.n_replay,
        holdout_samples=len(pool.holdout_idx),
        stratified_holdout=pool.stratified,
        steps_per_epoch=run.plan.epoch_batches,
        batch_size=recipe.batch_size,
        eval_every=run.plan.every,
        max_steps=int(run.plan.step_cap),
        curve=curve,
        mean_grad_norm=(tally.grad_total / steps) if steps else None,
        param_change=change,
        param_change_l2=change_l2,
        param_change_per_layer=per_layer,
        n_parameters=n_params,
        wall_time_s=tally.loop_end - run.t_zero,
        train_time_s=tally.train_s,
        eval_time_s=tally.eval_s,
        energy=measured.energy,
        energy_error=measured.energy_error,
        device=str(run.dev),
        seed=cfg.seed,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        error=measured.error_text,
        stop_reason=tally.stop_reason if status in ("stopped", "stopped_by_budget") else None,
        recipe=cfg.to_dict()["recipe"] | {"replay_fraction": replay_fraction},
        torch_threads=torch.get_num_threads(),
        holdout_indices=pool.holdout_idx.tolist(),
        model=run.work.eval(),
    )


def _raise_for_failure(result: RetrainResult, measured: _Measured, cfg: RetrainConfig) -> None:
    """A crash, or an energy measurement that failed where it is required, raises with the result."""
    crash, energy = measured.crash, measured.energy
    if crash is not None:
        cost = f"{energy.energy_kwh:.3g} kWh" if energy is not None else "energy unknown"
        message = f"retraining stopped after {result.steps} steps ({measured.error_text}); cost so far {cost}"
        if isinstance(crash, KeyboardInterrupt):
            raise RetrainInterrupted(message, result) from crash
        if isinstance(crash, FloatingPointError):
            message += "; lower the learning rate"
        raise RetrainError(message + ".", result) from crash
    if measured.energy_error is not None and cfg.energy.require:
        raise EnergyMeasurementError(measured.energy_error, partial=result)


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
    they make up that share of each epoch's pool (capped by the reference size). Every
    ``eval_every`` optimizer steps (default: a quarter epoch) the held-out accuracy is
    measured; the run stops at the first evaluation that meets the cutoff
    (:func:`shiftcost.forecast.protocol.cutoff_reached`), or when ``max_steps`` steps /
    ``max_epochs`` epochs are spent (the last step is always evaluated). The target is
    ``target_accuracy`` if given, else ``reference_accuracy - tolerance``, else the model's
    accuracy on ``(reference_x, reference_y)`` minus ``tolerance``.

    ``progress(point, step_cap, target)`` is called after every evaluation (the first at
    step 0). It may return a sentence to stop the run there: status ``"stopped"``, the
    sentence in ``stop_reason``, the cost so far recorded as for a cap. When it returns
    ``"stopped_by_budget"`` (see :class:`shiftcost.forecast.guard.BudgetGuard`) the run
    ends with that status, ``reached_cutoff`` false.

    Energy is measured with CodeCarbon around the evaluations and training (not the data
    preparation); ``energy_options`` go to :class:`~shiftcost.energy.EnergyMeter`. If the
    measurement fails, :class:`~shiftcost.energy.EnergyMeasurementError` is raised with the
    finished result in ``.partial`` (``require_energy=False`` records the error in
    ``energy_error`` instead).

    Repeatable: with the same seed (and on CPU, the same thread count) the same steps and
    accuracies come out. The caller's model and the global random state are untouched.

    Raises :class:`~shiftcost.errors.InputError` for unlabelled or too small batches and
    :class:`RetrainError` (or :class:`RetrainInterrupted` on Ctrl-C) carrying the partial
    result when a step fails.
    """
    cfg = (config or RetrainConfig()).replace(**settings)
    _check_xy(x, y, source)
    assert y is not None
    replay_fraction = _check_reference(x, reference_x, reference_y, cfg.recipe, target_accuracy, reference_accuracy, source)
    recipe = cfg.recipe
    augmentation = build_augmentation(recipe.augment)
    train_step = load_entry_point(recipe.train_step, "The training step") if recipe.train_step else None

    dev = resolve_device(cfg.device)
    work = copy.deepcopy(model).to(dev)
    params = _trainable(work)
    if not params:
        raise InputError("the model has no trainable parameters; nothing to retrain.")
    num_classes = _check_logits(work, x, y, dev, source)
    target_accuracy, reference_accuracy = _resolve_target(
        work, dev, cfg, reference_x, reference_y, target_accuracy, reference_accuracy, num_classes
    )

    pool = _build_pool(x, y, reference_x, reference_y, cfg, replay_fraction, source)
    run = _CutoffRun(work, params, pool, _plan(cfg, len(pool)), cfg, dev, target_accuracy, progress, augmentation, train_step)
    measured = run.run_measured()
    result = _result(run, measured, reference_accuracy, replay_fraction)
    _raise_for_failure(result, measured, cfg)
    return result
