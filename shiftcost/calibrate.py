"""Calibration sweeps: known shifts at known strengths, retrained for real, and how well
the indices predict what the retraining cost.

:func:`run_sweep` takes a model, its labelled reference data and a labelled batch of new
data. For every corruption kind and intensity of the sweep it

1. corrupts the new batch (seeded, :func:`shiftcost.shifts.corrupt`);
2. computes every index in one pass (:func:`shiftcost.index.engine.assess`, with the clean
   batch as ``paired_clean_x`` so PreIndex p comes too), plus the current model's accuracy,
   loss and entropy on the corrupted batch, and the full-batch gradient norm at the
   current weights;
3. retrains to the cutoff for real (:func:`shiftcost.retrain.retrain_to_cutoff`: target =
   reference accuracy minus ``tolerance``), ``repeats`` times with different split and
   shuffle seeds, and records steps, epochs, kWh, kg CO2e, gradient norms, parameter
   change, wall time, status and how the energy was measured.

A point is one row. Its measures are the means over the repeats; a point counts as
censored (``reached_cutoff`` false) when any repeat hit the cap, since the mean is then
only a lower bound of the cost. A point that crashes is recorded with its error and the
sweep goes on.

From the rows it derives Pearson and Spearman correlations of each index with each
measure (overall and per corruption kind), fits the cost model
(:class:`shiftcost.costmodel.CostModel`, capped runs censored) and evaluates it by
leaving one corruption kind out at a time. Energy predictions there go through epochs:
``kWh = epochs x samples x J per sample-epoch``, with the joules figure estimated from
the training kinds' runs only (the held-out kind's energy never informs its own
prediction); the hardware probe's figure is measured too and reported beside it.

:meth:`SweepResult.write` puts the table (JSON, CSV), the correlations (JSON and a
Markdown report), the cost model, the leave-one-out evaluation and a plot (PNG) into a
directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.data.demo import torch_threads
from shiftcost.errors import ConfigError, InputError
from shiftcost.forecast import protocol
from shiftcost.forecast.probe import PROBE_FEATURES
from shiftcost.recipe import Caps, Cutoff, RetrainConfig
from shiftcost.shifts import DEFAULT_SWEEP, corrupt

__all__ = [
    "COLUMNS",
    "COST_FEATURES",
    "CORRELATION_FEATURES",
    "CORRELATION_MEASURES",
    "INDEX_FEATURES",
    "QUICK_SWEEP",
    "SweepInterrupted",
    "SweepResult",
    "analyse",
    "best_index",
    "correlate",
    "full_batch_grad_norm",
    "markdown_report",
    "plot_sweep",
    "run_sweep",
    "torch_threads",
]

#: The indices proper (what the papers propose as predictors of retraining cost).
INDEX_FEATURES: tuple[str, ...] = ("resque_dist", "inv_ari", "layer_shift", "preindex_p")
#: Everything correlated with the measures: the indices plus the free figures of the same pass.
CORRELATION_FEATURES: tuple[str, ...] = INDEX_FEATURES + ("accuracy_drop", "mean_loss", "mean_entropy")
#: What retraining cost, per point.
CORRELATION_MEASURES: tuple[str, ...] = (
    "steps",
    "epochs",
    "energy_kwh",
    "emissions_kg",
    "grad_norm",
    "initial_grad_norm",
    "param_change",
)
#: Features of the fitted cost model. PreIndex p is left out: it needs the clean originals
#: of each shifted image, which production batches never have.
COST_FEATURES: tuple[str, ...] = ("resque_dist", "inv_ari", "layer_shift", "accuracy", "mean_loss", "mean_entropy")

#: A reduced sweep for smoke tests: two kinds, three intensities each.
#: Features that need no labels: the forecast of a batch whose labels have not come yet.
#: (``resque_dist`` groups by label when there are labels, so its value depends on them.)
LABEL_FREE_FEATURES: tuple[str, ...] = ("inv_ari", "layer_shift", "mean_entropy")
LABEL_FREE_FILE = "costmodel-label-free.json"


def label_free_analysis(rows: Sequence[Mapping[str, Any]], level: float) -> dict[str, Any]:
    """The label-free cost model fitted on the sweep's runs, and its leave-one-corruption-out figures."""
    found = analyse(list(rows), level=level, features=LABEL_FREE_FEATURES)
    return {
        "features": list(LABEL_FREE_FEATURES),
        "cost_model": found.cost_model,
        "error": found.cost_model_error,
        "loco": found.loco,
        "loco_error": found.loco_error,
    }


#: Sweep defaults: the measurement protocol's holdout and cadence (shiftcost.forecast.protocol),
#: the same as every other retrain's, and its 15-epoch cap.
SWEEP_CONFIG = RetrainConfig(cutoff=Cutoff(holdout_fraction=protocol.HOLDOUT_FRACTION), caps=Caps(max_epochs=protocol.MAX_EPOCHS))

QUICK_SWEEP: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.0, 0.1, 0.2),
    "contrast": (0.0, 0.2, 0.4),
}

GROUP_KEY = "corruption"
PLOT_NAME = "resque_dist_vs_energy.png"

#: Row columns written to the CSV, in this order (``runs`` and ``notes`` go to JSON only).
COLUMNS: tuple[str, ...] = (
    "corruption",
    "intensity",
    "status",
    "reached_cutoff",
    "censored",
    "repeats",
    "statuses",
    "resque_dist",
    "inv_ari",
    "layer_shift",
    "preindex_p",
    "accuracy",
    "accuracy_drop",
    "mean_loss",
    "mean_entropy",
    "reference_accuracy",
    "target_accuracy",
    "initial_accuracy",
    "final_accuracy",
    "steps",
    "epochs",
    "energy_kwh",
    "emissions_kg",
    "grad_norm",
    "first_grad_norm",
    "initial_grad_norm",
    "param_change",
    "wall_time_s",
    "train_time_s",
    "samples",
    "holdout_samples",
    "max_steps",
    "carbon_intensity_kg_per_kwh",
    "energy_measured",
    "energy_method",
    "index_seconds",
    "point_seconds",
    *PROBE_FEATURES,
    "probe_sample_gradients",
    "probe_seconds",
    "error",
)

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------- result


@dataclass
class SweepResult:
    """Everything a calibration sweep produced; :meth:`to_dict` is its JSON view.

    ``rows``: one dict per (corruption, intensity), keys :data:`COLUMNS` plus ``runs`` (each
    repeat's :meth:`RetrainResult.to_dict`) and ``notes``. ``correlations``: see
    :func:`correlate`. ``cost_model``: fitted on every point (``None`` with the reason in
    ``cost_model_error`` when the points do not allow a fit). ``loco``: the
    leave-one-corruption-out evaluation (``GroupOutReport.to_dict()``) with the joules
    figure estimated from the training kinds; ``loco_probe`` the same with the probe's
    figure. ``joules_per_sample_epoch``: ``probe`` (hardware probe, training only),
    ``sweep`` (all measured joules / all sample-epochs trained, evaluations included),
    ``loco`` (how the evaluation obtained its figure). ``timing``: wall and CPU seconds of
    the whole sweep and the load average around it.
    """

    rows: list[dict[str, Any]]
    correlations: dict[str, Any]
    cost_model: Any
    cost_model_error: str | None
    loco: dict[str, Any] | None
    loco_probe: dict[str, Any] | None
    loco_error: str | None
    plot_curve: dict[str, Any] | None
    joules_per_sample_epoch: dict[str, Any]
    probe: dict[str, Any] | None
    best_index: dict[str, Any]
    settings: dict[str, Any]
    timing: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    forecaster: Any = None
    label_free: dict[str, Any] | None = None
    """The label-free cost model (``cost_model``, features :data:`LABEL_FREE_FEATURES`) with
    its leave-one-corruption-out figures (``loco``) on the same runs, or its ``error``."""

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Rows whose point crashed."""
        return [row for row in self.rows if row["status"] == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (non-finite numbers become ``None``)."""
        return _jsonable(
            {
                "settings": self.settings,
                "timing": self.timing,
                "joules_per_sample_epoch": self.joules_per_sample_epoch,
                "probe": self.probe,
                "rows": self.rows,
                "correlations": self.correlations,
                "best_index": self.best_index,
                "cost_model": None if self.cost_model is None else _cost_model_summary(self.cost_model),
                "cost_model_error": self.cost_model_error,
                "loco": self.loco,
                "loco_probe": self.loco_probe,
                "loco_error": self.loco_error,
                "label_free": None if self.label_free is None else {k: v for k, v in self.label_free.items() if k != "cost_model"},
                "plot_curve": self.plot_curve,
                "files": self.files,
            }
        )

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Write every output into ``out_dir`` (created if needed); returns name -> path."""
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create the output directory {out} ({error.strerror}); choose a writable path.") from None
        files = {
            "table_json": out / "points.json",
            "table_csv": out / "points.csv",
            "correlations_json": out / "correlations.json",
            "report": out / "report.md",
            "loco_json": out / "loco.json",
            "plot": out / PLOT_NAME,
            "sweep_json": out / "sweep.json",
        }
        if self.cost_model is not None:
            files["cost_model"] = out / "costmodel.json"
        if self.forecaster is not None:
            files["forecaster"] = out / "forecaster.json"
        label_free_model = (self.label_free or {}).get("cost_model")
        if label_free_model is not None:
            files["label_free_cost_model"] = out / LABEL_FREE_FILE
        self.files = {name: str(path) for name, path in files.items()}
        _write_text(files["table_json"], json.dumps(_jsonable(self.rows), indent=1, allow_nan=False))
        _write_csv(files["table_csv"], self.rows)
        _write_text(files["correlations_json"], json.dumps(_jsonable(self.correlations), indent=1, allow_nan=False))
        loco = {"leave_one_corruption_out": self.loco, "with_probe_joules": self.loco_probe, "error": self.loco_error}
        _write_text(files["loco_json"], json.dumps(_jsonable(loco), indent=1, allow_nan=False))
        if self.cost_model is not None:
            _write_text(files["cost_model"], self.cost_model.to_json())
        if self.forecaster is not None:
            _write_text(files["forecaster"], self.forecaster.to_json())
        if label_free_model is not None:
            _write_text(files["label_free_cost_model"], label_free_model.to_json())
        plot_sweep(self, files["plot"])
        _write_text(files["report"], markdown_report(self))
        _write_text(files["sweep_json"], json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return dict(self.files)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was interrupted (Ctrl-C); ``rows`` holds the points finished so far (also
    written to ``points.json``/``points.csv`` when the sweep had an output directory).
    A ``KeyboardInterrupt``, so that it still ends the program."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    model: nn.Module,
    spec: Any,
    reference_x: torch.Tensor,
    reference_y: torch.Tensor,
    new_x: torch.Tensor,
    new_y: torch.Tensor,
    *,
    sweep: Mapping[str, Sequence[float]] = DEFAULT_SWEEP,
    seed: int = 0,
    repeats: int = 2,
    config: RetrainConfig | None = None,
    probe_steps: int = 0,
    threads: int | None = 1,
    probe: bool = True,
    probe_seconds: float = 3.0,
    level: float = 0.90,
    features: Sequence[str] = COST_FEATURES,
    reference_stats: Any = None,
    progress: Progress | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    time_budget_s: float | None = None,
    **retrain_settings: Any,
) -> SweepResult:
    """Run a calibration sweep of ``model`` and evaluate how well the indices predict the cost.

    ``reference_x, reference_y``: the labelled reference data (its summary feeds the
    indices and the model's accuracy on it sets the target, minus ``tolerance``; pass
    ``reference_stats`` to reuse a stored summary). ``new_x, new_y``: the labelled new data
    that every point corrupts and retrains on; ``retrain_to_cutoff`` holds out
    ``holdout_fraction`` of it to judge the cutoff. ``sweep`` maps a corruption kind to its
    intensities (include 0). Each point is retrained ``repeats`` times with seeds
    ``seed, seed + 1, ...`` (split, shuffling); the corruption itself uses ``seed``.

    Retraining settings: ``config`` (default :data:`SWEEP_CONFIG` with the recipe the model
    file carries), changed by flat names in ``retrain_settings`` (``lr=``, ``max_epochs=``,
    ``device=`` ...; see :meth:`~shiftcost.recipe.RetrainConfig.replace`); every run uses
    them through :func:`~shiftcost.retrain.retrain_to_cutoff`, so the sweep measures the
    recipe the model's retrains use.
    ``threads`` sets torch's CPU threads for the sweep (restored afterwards; ``None`` leaves
    them): a model this small gains nothing from intra-op threads, and on a busy machine
    they spin against other processes and make every step several times slower.
    ``probe`` also measures joules per sample-epoch with the hardware probe for at least
    ``probe_seconds``. ``probe_steps`` > 0 (``shiftcost calibrate`` uses 16) also runs the learning probe
    (:func:`shiftcost.forecast.probe.run_probe`) on every point, so that the forecast's
    probe stage is calibrated too. The holdout, cadence and cap default to
    :mod:`shiftcost.forecast.protocol`, the same as ``shiftcost retrain``. ``features`` are the cost model's; ``level`` its interval coverage.
    ``progress(done, total, label)`` is called before the first point and after each one.
    With ``out_dir`` the outputs are written there (see :meth:`SweepResult.write`).
    With ``time_budget_s`` the points are taken round-robin over the kinds (every kind's
    first intensity, then every kind's second, ...) and the sweep stops before a point that
    would likely end past the budget, so a short budget still covers every kind.
    """
    from shiftcost.index.engine import assess, compute_reference_stats

    config = (config or SWEEP_CONFIG.for_model(spec)).replace(**retrain_settings)
    config = config.replace(require_energy=False)
    recipe, cutoff, caps = config.recipe, config.cutoff, config.caps
    device = config.device
    _check_data(reference_x, reference_y, "the reference data")
    _check_data(new_x, new_y, "the new data")
    plan = _check_plan(sweep, new_x)
    if time_budget_s is not None:
        plan = _round_robin(plan)
    _check_settings(repeats, threads, level, features)
    started_wall = time.perf_counter()
    started_cpu = _cpu_seconds()
    load_start = _load_average()
    settings = {
        "sweep": {kind: list(values) for kind, values in sweep.items()},
        "seed": seed,
        "repeats": repeats,
        "tolerance": cutoff.tolerance,
        "eval_every": cutoff.eval_every,
        "max_epochs": caps.max_epochs,
        "max_steps": caps.max_steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "optimizer": recipe.optimizer,
        "holdout_fraction": cutoff.holdout_fraction,
        "replay_fraction": recipe.replay_with(True),
        "country_iso_code": config.energy.country_iso_code,
        "probe_steps": probe_steps,
        "retrain": config.to_dict(),
        "threads": threads,
        "level": level,
        "features": list(features),
        "reference_samples": int(len(reference_y)),
        "new_samples": int(len(new_y)),
        "architecture": getattr(spec, "architecture", None),
    }
    rows: list[dict[str, Any]] = []
    probe_result: dict[str, Any] | None = None
    with torch_threads(threads):
        if reference_stats is None:
            reference_stats = compute_reference_stats(model, spec, reference_x, reference_y, device=device, seed=seed)
        reference_accuracy = reference_stats.accuracy
        protocol.check_above_chance(reference_accuracy, getattr(spec, "num_classes", None), cutoff.tolerance, "the reference data")
        settings["reference_accuracy"] = reference_accuracy
        settings["device"] = str(_resolve_device(device))
        replay = recipe.replay_with(True) > 0
        retrain_kwargs = dict(
            config=config,
            reference_x=reference_x if replay else None,
            reference_y=reference_y if replay else None,
            reference_accuracy=reference_accuracy,
        )
        if progress is not None:
            progress(0, len(plan), "starting")
        try:
            for done, (kind, intensity) in enumerate(plan, start=1):
                spent = time.perf_counter() - started_wall
                if time_budget_s is not None and rows and spent + spent / len(rows) > time_budget_s:
                    settings["stopped_early"] = f"time budget of {time_budget_s:g} s: {len(rows)} of {len(plan)} points"
                    break
                row = _run_point(
                    model, spec, reference_stats, new_x, new_y, kind, intensity, seed, repeats, retrain_kwargs, assess,
                    probe_steps=probe_steps,
                )
                rows.append(row)
                if progress is not None:
                    progress(done, len(plan), f"{kind} {intensity:g}: {row['status']}")
        except KeyboardInterrupt as interrupt:
            if out_dir is not None and rows:
                _write_partial(Path(out_dir), rows)
            where = f"; they are in {out_dir}" if out_dir is not None and rows else ""
            raise SweepInterrupted(f"sweep interrupted after {len(rows)} of {len(plan)} points{where}", rows) from interrupt
        if probe:
            probe_result = _probe(model, spec, new_x, new_y, seed, device, config.energy.country_iso_code, config.energy.options, probe_seconds, recipe.batch_size)

    result = analyse(rows, settings=settings, probe=probe_result, level=level, features=features)
    result.label_free = label_free_analysis(rows, level)
    result.timing = {
        "wall_s": time.perf_counter() - started_wall,
        "cpu_s": _cpu_seconds() - started_cpu,
        "load_average_start": load_start,
        "load_average_end": _load_average(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "points": len(rows),
        "retrain_runs": sum(len(row.get("runs", [])) for row in rows),
    }
    if out_dir is not None:
        result.write(out_dir)
    return result


def _run_point(
    model: nn.Module,
    spec: Any,
    reference_stats: Any,
    new_x: torch.Tensor,
    new_y: torch.Tensor,
    kind: str,
    intensity: float,
    seed: int,
    repeats: int,
    retrain_kwargs: dict[str, Any],
    assess: Callable[..., Any],
    probe_steps: int = 0,
) -> dict[str, Any]:
    """One point of the sweep; never raises an ``Exception`` (a crash is recorded in the row)."""
    from shiftcost.retrain import RetrainError, retrain_to_cutoff

    device = retrain_kwargs["config"].device

    started = time.perf_counter()
    row: dict[str, Any] = {name: None for name in COLUMNS}
    row.update(corruption=kind, intensity=float(intensity), repeats=repeats, runs=[], notes=[])
    stage = "corruption"
    try:
        shifted = corrupt(new_x, kind, intensity, seed=seed)
        stage = "indices"
        report = assess(model, spec, reference_stats, shifted, new_y, paired_clean_x=new_x, device=device)
        row.update(
            resque_dist=report.resque_dist,
            inv_ari=report.inv_ari,
            layer_shift=report.layer_shift,
            preindex_p=report.preindex_p,
            accuracy=report.accuracy,
            mean_loss=report.mean_loss,
            mean_entropy=report.mean_entropy,
            reference_accuracy=report.reference_accuracy,
            index_seconds=report.seconds,
        )
        if report.accuracy is not None and report.reference_accuracy is not None:
            row["accuracy_drop"] = report.reference_accuracy - report.accuracy
        row["notes"].extend(report.notes)
        row["initial_grad_norm"] = full_batch_grad_norm(model, shifted, new_y, device=device)
        stage = "retraining"
        for repeat in range(repeats):
            try:
                run = retrain_to_cutoff(model, shifted, new_y, seed=seed + repeat, **retrain_kwargs)
            except RetrainError as error:
                row["runs"].append(error.partial.to_dict())
                raise
            row["runs"].append(run.to_dict())
        _summarise_runs(row)
        if probe_steps > 0:
            stage = "probe"
            _probe_point(row, model, shifted, new_y, seed, probe_steps, retrain_kwargs)
    except Exception as error:  # noqa: BLE001 - one bad point must not end the sweep
        row["status"] = "failed"
        row["reached_cutoff"] = False
        row["error"] = f"{stage}: {type(error).__name__}: {error}"
        if row["runs"]:
            _summarise_runs(row, failed=True)
    row["point_seconds"] = time.perf_counter() - started
    return row


def _summarise_runs(row: dict[str, Any], failed: bool = False) -> None:
    """Means over the repeats; the point's status is its worst repeat's."""
    runs = row["runs"]
    statuses = [run["status"] for run in runs]
    row["statuses"] = ",".join(statuses)
    if failed:
        row["status"] = "failed"
    elif "cap_reached" in statuses:
        row["status"] = "cap_reached"
    elif all(status == "already_met" for status in statuses):
        row["status"] = "already_met"
    else:
        row["status"] = "reached"
    row["reached_cutoff"] = row["status"] in ("reached", "already_met")
    row["censored"] = row["status"] == "cap_reached"
    for name in ("steps", "epochs", "param_change", "wall_time_s", "train_time_s", "initial_accuracy", "final_accuracy"):
        row[name] = _mean(run.get(name) for run in runs)
    row["target_accuracy"] = runs[0]["target_accuracy"]
    row["samples"] = runs[0]["train_samples"] + runs[0]["replay_samples"]
    row["holdout_samples"] = runs[0]["holdout_samples"]
    row["max_steps"] = runs[0]["max_steps"]
    row["grad_norm"] = _mean(run.get("mean_grad_norm") for run in runs)
    row["first_grad_norm"] = _mean(_first_grad_norm(run) for run in runs)
    energies = [run.get("energy") for run in runs]
    if all(energy is not None for energy in energies):
        row["energy_kwh"] = _mean(energy["energy_kwh"] for energy in energies)
        row["emissions_kg"] = _mean(energy["emissions_kg"] for energy in energies)
        first = energies[0]
        row["carbon_intensity_kg_per_kwh"] = first.get("carbon_intensity_kg_per_kwh")
        row["energy_measured"] = all(
            energy["cpu_measured"] and energy["ram_measured"] and energy.get("gpu_measured") is not False for energy in energies
        )
        row["energy_method"] = f"CPU {first['cpu_method']}; RAM {first['ram_method']}; GPU {first['gpu_method']}"
    else:
        reasons = sorted({run.get("energy_error") or "not measured" for run in runs if run.get("energy") is None})
        row["notes"].append(f"energy missing for some repeats: {'; '.join(reasons)}")


def _probe_point(
    row: dict[str, Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int, retrain_kwargs: Mapping[str, Any]
) -> None:
    """The learning probe's features and cost on this point (what the forecast will see)."""
    from shiftcost.forecast.probe import probe_features, run_probe

    config = retrain_kwargs["config"]
    reference = retrain_kwargs["reference_accuracy"]
    target = max(0.0, reference - config.cutoff.tolerance)
    cap = config.caps.max_epochs or protocol.MAX_EPOCHS
    trajectory = run_probe(
        model, x, y, target_accuracy=target, ceiling=reference, steps=steps, lr=config.recipe.lr,
        optimizer=config.recipe.optimizer, holdout_fraction=config.cutoff.holdout_fraction, seed=seed,
        device=config.device,
    )
    row.update(probe_features(trajectory.epochs, trajectory.accuracy, trajectory.loss, target=target, ceiling=reference, cap_epochs=cap))
    row["probe_sample_gradients"] = trajectory.cost.sample_gradients
    row["probe_seconds"] = trajectory.cost.seconds


def _first_grad_norm(run: Mapping[str, Any]) -> float | None:
    for point in run.get("curve", []):
        if point.get("grad_norm") is not None:
            return point["grad_norm"]
    return None


def full_batch_grad_norm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: str | torch.device = "auto", batch_size: int = 512
) -> float:
    """Global L2 norm of the gradient of the mean cross-entropy over ``(x, y)`` at the
    model's current weights, in eval mode (batch norm on its running statistics), so it
    is defined for every point, including those that needed no training step. The model's
    weights, gradients and mode are left as they were."""
    dev = _resolve_device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters, so its gradient norm is undefined.")
    was_training = model.training
    original = next(model.parameters()).device
    model.eval().to(dev)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(dev)
            yb = y[start : start + batch_size].to(dev)
            loss = F.cross_entropy(model(xb).float(), yb, reduction="sum") / len(x)
            for acc, grad in zip(total, torch.autograd.grad(loss, params)):
                acc += grad.double()
    finally:
        model.to(original).train(was_training)
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in total])))


def _probe(
    model: nn.Module,
    spec: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    device: str | torch.device,
    country_iso_code: str,
    energy_options: Mapping[str, Any] | None,
    seconds: float,
    batch_size: int,
) -> dict[str, Any]:
    from shiftcost.retrain import probe_joules_per_sample_epoch

    try:
        samples = min(512, len(x))
        result = probe_joules_per_sample_epoch(
            model,
            spec,
            samples=samples,
            x=x,
            y=y,
            min_seconds=seconds,
            batch_size=batch_size,
            seed=seed,
            device=device,
            country_iso_code=country_iso_code,
            energy_options=dict(energy_options or {}),
        )
        return result.to_dict()
    except Exception as error:  # noqa: BLE001 - the probe is a cross-check; its failure is reported
        return {"error": f"{type(error).__name__}: {error}"}


# --------------------------------------------------------------------------- analysis


def analyse(
    rows: list[dict[str, Any]],
    *,
    settings: Mapping[str, Any] | None = None,
    probe: Mapping[str, Any] | None = None,
    level: float = 0.90,
    features: Sequence[str] = COST_FEATURES,
    max_epochs: float | None = None,
) -> SweepResult:
    """Correlations, cost model, leave-one-corruption-out evaluation and plot curve of sweep rows.

    ``max_epochs`` is the sweep's epoch cap (default: ``settings["max_epochs"]``, else the
    protocol's): the cost model's "not to converge" flag is judged against it, whether or
    not any run was capped. Alongside the index cost model a
    :class:`~shiftcost.forecast.forecaster.Forecaster` is fitted (stage 0, stage 1 when the
    rows carry the probe's features, and the host's energy rate from the measured runs).
    """
    from shiftcost.costmodel import CostModel, leave_one_group_out
    from shiftcost.energy import HostEnergyRate, run_work
    from shiftcost.forecast.forecaster import Forecaster

    if max_epochs is None:
        max_epochs = (settings or {}).get("max_epochs") or protocol.MAX_EPOCHS

    usable = [row for row in rows if row["status"] != "failed"]
    correlations = correlate(usable)
    fit_rows = [_fit_row(row) for row in usable if _fit_ready(row, features)]
    sweep_joules = _sweep_joules(usable)
    probe_joules = None if not probe or "joules_per_sample_epoch" not in probe else float(probe["joules_per_sample_epoch"])

    # The analysis never loses the measured rows: a part that cannot be computed records why.
    cost_model: Any = None
    cost_model_error: str | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            cost_model = CostModel(level=level, features=list(features), max_epochs=max_epochs).fit(
                fit_rows, groups=GROUP_KEY, note="calibration sweep"
            )
        except Exception as error:  # noqa: BLE001
            cost_model_error = _describe(error)
        forecaster = None
        if cost_model is not None:
            runs = [run_work(run) for row in usable for run in row.get("runs", [])]
            hardware = next((run["energy"].get("cpu_model") for row in usable for run in row.get("runs", []) if run.get("energy")), None)
            try:
                rate = HostEnergyRate.fit(runs, hardware=hardware)
            except Exception:  # noqa: BLE001 - no measured energy: epochs are still forecast
                rate = None
            try:
                forecaster = Forecaster.fit(
                    fit_rows, features=list(features), level=level, max_epochs=max_epochs, group_key=GROUP_KEY,
                    energy_rate=rate, batch_size=int((settings or {}).get("batch_size") or 64),
                    probe_settings={"steps": (settings or {}).get("probe_steps")},
                )
            except Exception as error:  # noqa: BLE001
                cost_model_error = _describe(error)

        loco = loco_probe = None
        loco_error: str | None = None
        try:
            loco = leave_one_group_out(fit_rows, GROUP_KEY, level=level, features=list(features)).to_dict()
            if probe_joules is not None:
                loco_probe = leave_one_group_out(
                    fit_rows, GROUP_KEY, level=level, joules_per_sample_epoch=probe_joules, features=list(features)
                ).to_dict()
        except Exception as error:  # noqa: BLE001
            loco_error = _describe(error)

        plot_curve, plot_error = _single_index_curve(fit_rows, level)

    return SweepResult(
        rows=rows,
        correlations=correlations,
        cost_model=cost_model,
        cost_model_error=cost_model_error,
        loco=loco,
        loco_probe=loco_probe,
        loco_error=loco_error,
        plot_curve=plot_curve if plot_curve is not None else {"error": plot_error},
        joules_per_sample_epoch={
            "probe": probe_joules,
            "sweep": sweep_joules,
            "loco": "per held-out kind: median J per sample-epoch of the training kinds' runs that reached the cutoff",
        },
        probe=dict(probe) if probe else None,
        best_index=best_index(correlations),
        settings=dict(settings or {}),
        timing={},
        forecaster=forecaster,
    )


def correlate(
    rows: Sequence[Mapping[str, Any]],
    features: Sequence[str] = CORRELATION_FEATURES,
    measures: Sequence[str] = CORRELATION_MEASURES,
    group_key: str = GROUP_KEY,
) -> dict[str, Any]:
    """Pearson and Spearman correlation of each feature with each measure.

    ``{"overall": {feature: {measure: cell}}, "per_type": {kind: {feature: {measure: cell}}}}``
    with ``cell = {"n", "pearson", "pearson_p", "spearman", "spearman_p"}``. Each pair uses
    the rows where both values are finite numbers; a capped run enters with what it spent
    (a lower bound of its cost). With fewer than 3 such rows, or a constant column, the
    coefficients are ``None`` and ``reason`` says why.
    """
    kinds = list(dict.fromkeys(row[group_key] for row in rows))
    return {
        "n_rows": len(rows),
        "features": list(features),
        "measures": list(measures),
        "overall": _correlation_grid(rows, features, measures),
        "per_type": {
            kind: _correlation_grid([row for row in rows if row[group_key] == kind], features, measures) for kind in kinds
        },
    }


def _correlation_grid(
    rows: Sequence[Mapping[str, Any]], features: Sequence[str], measures: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    from scipy import stats

    grid: dict[str, dict[str, dict[str, Any]]] = {}
    for feature in features:
        grid[feature] = {}
        for measure in measures:
            pairs = [(float(r[feature]), float(r[measure])) for r in rows if _finite(r.get(feature)) and _finite(r.get(measure))]
            cell: dict[str, Any] = {"n": len(pairs), "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
            if len(pairs) < 3:
                cell["reason"] = f"{len(pairs)} points with both values (need 3)"
            else:
                a = [p[0] for p in pairs]
                b = [p[1] for p in pairs]
                if len(set(a)) < 2 or len(set(b)) < 2:
                    cell["reason"] = "constant " + (feature if len(set(a)) < 2 else measure)
                else:
                    pearson = stats.pearsonr(a, b)
                    spearman = stats.spearmanr(a, b)
                    cell.update(
                        pearson=float(pearson.statistic),
                        pearson_p=float(pearson.pvalue),
                        spearman=float(spearman.statistic),
                        spearman_p=float(spearman.pvalue),
                    )
            grid[feature][measure] = cell
    return grid


def best_index(correlations: Mapping[str, Any], measure: str = "energy_kwh") -> dict[str, Any]:
    """Which feature ranks ``measure`` best: by Spearman over the whole sweep, and by the
    mean Spearman within corruption kinds (kinds where it is undefined are skipped)."""
    overall = {f: correlations["overall"][f][measure]["spearman"] for f in correlations["features"]}
    within: dict[str, float | None] = {}
    for feature in correlations["features"]:
        values = [
            grid[feature][measure]["spearman"]
            for grid in correlations["per_type"].values()
            if grid[feature][measure]["spearman"] is not None
        ]
        within[feature] = sum(values) / len(values) if values else None

    def top(scores: Mapping[str, float | None], names: Sequence[str]) -> str | None:
        ranked = [n for n in names if scores.get(n) is not None]
        return max(ranked, key=lambda n: scores[n]) if ranked else None

    def tied(names: Sequence[str]) -> list[str]:
        ranked = [n for n in names if within.get(n) is not None]
        if not ranked:
            return []
        best = max(within[n] for n in ranked)
        return [n for n in ranked if abs(within[n] - best) <= 1e-9]

    def top_within(names: Sequence[str]) -> str | None:
        # Within kinds every index is often a perfect 1.0 (intensity orders each kind's
        # points); then the pick is only a tie-break, by the overall Spearman.
        candidates = tied(names)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        return max(candidates, key=lambda n: (overall.get(n) is not None, overall.get(n) or 0.0))

    indices = [f for f in correlations["features"] if f in INDEX_FEATURES]
    index_ties = tied(indices)
    return {
        "within_type_tie": index_ties if len(index_ties) > 1 else [],
        "within_type_rule": "highest mean within-kind Spearman; ties broken by the overall Spearman",
        "measure": measure,
        "overall_spearman": overall,
        "mean_within_type_spearman": within,
        "best_index_overall": top(overall, indices),
        "best_index_within_type": top_within(indices),
        "best_feature_overall": top(overall, correlations["features"]),
        "best_feature_within_type": top_within(correlations["features"]),
    }


def _fit_ready(row: Mapping[str, Any], features: Sequence[str]) -> bool:
    needed = list(features) + ["epochs", "samples"]
    return row["status"] != "failed" and all(_finite(row.get(name)) for name in needed)


def _fit_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The cost model's view of a point: features, target epochs, censoring, energy."""
    keys = set(COST_FEATURES) | set(INDEX_FEATURES) | set(PROBE_FEATURES) | {"accuracy_drop"}
    out = {name: row[name] for name in keys if _finite(row.get(name))}
    out.update(
        corruption=row[GROUP_KEY],
        intensity=row["intensity"],
        epochs=float(row["epochs"]),
        reached_cutoff=bool(row["reached_cutoff"]),
        samples=float(row["samples"]),
        energy_kwh=row.get("energy_kwh"),
    )
    return out


def _sweep_joules(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """All measured joules over all sample-epochs trained (evaluation energy included)."""
    joules = sample_epochs = 0.0
    for row in rows:
        for run in row.get("runs", []):
            energy = run.get("energy")
            if energy is None or not run.get("epochs"):
                continue
            joules += energy["energy_kwh"] * 3.6e6
            sample_epochs += run["epochs"] * (run["train_samples"] + run["replay_samples"])
    return joules / sample_epochs if sample_epochs > 0 else None


def _single_index_curve(fit_rows: Sequence[Mapping[str, Any]], level: float) -> tuple[dict[str, Any] | None, str | None]:
    """Cost model on RESQUE_dist alone, over a grid spanning the sweep, for the plot."""
    from shiftcost.costmodel import CostModel, estimate_joules_per_sample_epoch

    try:
        model = CostModel(level=level, features=["resque_dist"]).fit(list(fit_rows), groups=GROUP_KEY)
        joules = estimate_joules_per_sample_epoch(fit_rows)
    except Exception as error:  # noqa: BLE001 - the plot then shows the points only
        return None, _describe(error)
    values = [row["resque_dist"] for row in fit_rows]
    samples = sorted(row["samples"] for row in fit_rows)[len(fit_rows) // 2]
    lo, hi = min(values), max(values)
    grid = [lo + (hi - lo) * i / 60 for i in range(61)]
    predictions = model.predict_costs([{"resque_dist": v} for v in grid], samples=samples, joules_per_sample_epoch=joules)
    return {
        "feature": "resque_dist",
        "level": level,
        "samples": samples,
        "joules_per_sample_epoch": joules,
        "x": grid,
        "energy_kwh": [p.energy_kwh for p in predictions],
        "energy_kwh_lower": [p.energy_kwh_lower for p in predictions],
        "energy_kwh_upper": [p.energy_kwh_upper for p in predictions],
        "loo": model.loo_,
    }, None


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


# --------------------------------------------------------------------------- outputs


def plot_sweep(result: SweepResult, path: str | os.PathLike[str]) -> Path:
    """PNG of RESQUE_dist against measured energy, one colour per corruption, with the
    single-index cost model's curve and interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    try:
        kinds = list(dict.fromkeys(row[GROUP_KEY] for row in result.rows))
        colours = plt.get_cmap("tab10")
        for number, kind in enumerate(kinds):
            points = [r for r in result.rows if r[GROUP_KEY] == kind and _finite(r.get("resque_dist")) and _finite(r.get("energy_kwh"))]
            for censored, marker in ((False, "o"), (True, "^")):
                chosen = [r for r in points if bool(r.get("censored")) == censored]
                if chosen:
                    ax.scatter(
                        [r["resque_dist"] for r in chosen],
                        [r["energy_kwh"] * 1000 for r in chosen],
                        color=colours(number % 10),
                        marker=marker,
                        facecolors="none" if censored else colours(number % 10),
                        s=42,
                        label=kind if not censored else None,
                    )
        if any(r.get("censored") for r in result.rows):
            ax.scatter([], [], marker="^", facecolors="none", edgecolors="grey", label="cap reached (lower bound)")
        measured = [r["energy_kwh"] * 1000 for r in result.rows if _finite(r.get("energy_kwh"))]
        curve = result.plot_curve or {}
        if "x" in curve:
            level = f"{curve['level']:.0%}"
            lower = [v * 1000 if v is not None else math.nan for v in curve["energy_kwh_lower"]]
            upper = [v * 1000 if v is not None and math.isfinite(v) else math.nan for v in curve["energy_kwh_upper"]]
            ax.fill_between(curve["x"], lower, upper, color="grey", alpha=0.2, label=f"{level} CV+ interval")
            ax.plot(curve["x"], [v * 1000 for v in curve["energy_kwh"]], color="black", lw=1.5, label="cost model on RESQUE_dist alone")
            caption = (
                f"Curve: censored cost model fitted on RESQUE_dist only (epochs x {curve['samples']:g} samples x "
                f"{curve['joules_per_sample_epoch']:.3g} J/sample-epoch); the multi-feature model is evaluated in report.md. "
                "Hollow triangles: cap reached (energy is a lower bound)."
            )
        else:
            caption = f"No fitted curve: {curve.get('error', 'not enough points')}. Hollow triangles: cap reached (lower bound)."
        if measured:
            # The band widens fast beyond the data; keep the measured points readable.
            ax.set_ylim(bottom=0.0, top=1.6 * max(measured) if max(measured) > 0 else None)
        ax.set_xlabel("RESQUE_dist (penultimate layer)")
        ax.set_ylabel("measured retraining energy (Wh)")
        ax.set_title("Calibration sweep: index vs energy to reach the cutoff")
        ax.legend(fontsize=8, loc="upper left")
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
        fig.subplots_adjust(bottom=0.18)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def markdown_report(result: SweepResult) -> str:
    """A readable summary: settings, timing, correlation tables, best index, cost model, LOCO."""
    lines: list[str] = ["# Calibration sweep", ""]
    s, t = result.settings, result.timing
    ok = [r for r in result.rows if r["status"] != "failed"]
    lines += [
        f"- model: {s.get('architecture')}, reference accuracy {_fmt(s.get('reference_accuracy'), '.4f')}, "
        f"target = reference - {s.get('tolerance')}; {s.get('reference_samples')} reference / {s.get('new_samples')} new samples",
        f"- points: {len(result.rows)} ({len(result.rows) - len(ok)} failed); retraining runs per point: {s.get('repeats')} "
        f"(seeds {s.get('seed')}..); eval every {s.get('eval_every')} steps; cap {s.get('max_epochs')} epochs / {s.get('max_steps')} steps; "
        f"batch {s.get('batch_size')}, lr {s.get('lr')}, {s.get('optimizer')}; device {s.get('device')}, {s.get('threads')} torch thread(s)",
        f"- statuses: " + ", ".join(f"{k} {v}" for k, v in _count(r["status"] for r in result.rows).items()),
    ]
    if t:
        lines.append(
            f"- time: {_fmt(t.get('wall_s'), '.1f')} s wall, {_fmt(t.get('cpu_s'), '.1f')} s CPU "
            f"(load average {_fmt_load(t.get('load_average_start'))} at start, {_fmt_load(t.get('load_average_end'))} at end, "
            f"{t.get('cpu_count')} CPUs)"
        )
    j = result.joules_per_sample_epoch
    lines.append(
        f"- joules per sample-epoch: probe {_fmt(j.get('probe'), '.4g')} (training only), sweep {_fmt(j.get('sweep'), '.4g')} "
        "(all measured joules / all sample-epochs, evaluations included)"
    )
    methods = sorted({r["energy_method"] for r in ok if r.get("energy_method")})
    if methods:
        lines.append(f"- energy measured by: {'; '.join(methods)}")
    lines += ["", "Capped runs enter the correlations with what they spent (a lower bound of their cost).", ""]

    corr = result.correlations
    lines += ["## Correlations over the whole sweep (Spearman rho / Pearson r)", ""]
    lines += _grid_table(corr["overall"], corr["features"], corr["measures"])
    lines += ["", "## Spearman rho with energy, per corruption kind", ""]
    kinds = list(corr["per_type"])
    lines.append("| feature | " + " | ".join(kinds) + " |")
    lines.append("|---" * (len(kinds) + 1) + "|")
    for feature in corr["features"]:
        cells = [_fmt(corr["per_type"][k][feature]["energy_kwh"]["spearman"], "+.2f") for k in kinds]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    b = result.best_index
    lines += [
        "",
        f"Best index for energy: {b.get('best_index_overall')} over the whole sweep, {b.get('best_index_within_type')} within kinds "
        f"(best feature of all: {b.get('best_feature_overall')} overall, {b.get('best_feature_within_type')} within kinds).",
        *(
            [f"Within kinds the indices {', '.join(b['within_type_tie'])} tie; the pick among them is only a tie-break by the overall Spearman."]
            if b.get("within_type_tie")
            else []
        ),
        "",
        "## Cost model",
        "",
    ]
    if result.cost_model is not None:
        summary = _cost_model_summary(result.cost_model)
        coef = ", ".join(f"{k} {v:+.3g}" for k, v in summary["coefficients"].items())
        loo = summary["loo"]
        lines.append(
            f"Fitted on {summary['n_train']} points ({summary['n_censored']} censored): log(epochs + 1) = "
            f"{summary['intercept']:.3g} + {coef}; sigma {summary['sigma']:.3g}. "
            f"CV+ over kinds: MdAPE epochs {_pct(loo.get('mdape_epochs'))}, coverage {_pct(loo.get('coverage'))}."
        )
    else:
        lines.append(f"Not fitted: {result.cost_model_error}")
    lines += ["", "## Leave one corruption kind out (energy through epochs x samples x J/sample-epoch)", ""]
    if result.loco is not None:
        lines += _loco_table(result.loco["summary"], "J/sample-epoch from the training kinds")
        if result.loco_probe is not None:
            lines += ["", *_loco_table(result.loco_probe["summary"], "J/sample-epoch from the hardware probe")]
    else:
        lines.append(f"Not evaluated: {result.loco_error}")
    failed = result.failed
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- {r[GROUP_KEY]} {r['intensity']:g}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _grid_table(grid: Mapping[str, Any], features: Sequence[str], measures: Sequence[str]) -> list[str]:
    lines = ["| feature | " + " | ".join(measures) + " |", "|---" * (len(measures) + 1) + "|"]
    for feature in features:
        cells = [f"{_fmt(grid[feature][m]['spearman'], '+.2f')} / {_fmt(grid[feature][m]['pearson'], '+.2f')}" for m in measures]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return lines


def _loco_table(summary: Mapping[str, Any], title: str) -> list[str]:
    lines = [
        f"{title}:",
        "",
        "| held-out kind | n | censored | MdAPE energy | MdAPE epochs | coverage energy | coverage epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = dict(summary.get("per_group", {}))
    groups["**all**"] = summary
    for name, g in groups.items():
        lines.append(
            f"| {name} | {g['n']} | {g['n_censored']} | {_pct(g['mdape_energy'])} | {_pct(g['mdape_epochs'])} | "
            f"{_pct(g['coverage_energy'])} | {_pct(g['coverage_epochs'])} |"
        )
    return lines


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    tmp.replace(path)


def _write_partial(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "points.json", json.dumps(_jsonable(rows), indent=1, allow_nan=False))
    _write_csv(out / "points.csv", rows)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- checks and helpers


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value
