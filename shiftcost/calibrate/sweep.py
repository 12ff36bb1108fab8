"""Running the sweep: corrupt, measure every index, retrain to the cutoff, probe."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.calibrate.analysis import analyse, label_free_analysis
from shiftcost.calibrate.helpers import _check_data, _check_plan, _check_settings, _cpu_seconds, _load_average, _mean, _resolve_device, _round_robin
from shiftcost.calibrate.ladder import describe_fits, fit_sweep
from shiftcost.calibrate.outputs import _write_partial
from shiftcost.calibrate.result import SweepInterrupted, SweepResult
from shiftcost.calibrate.settings import COLUMNS, COST_FEATURES, SWEEP_CONFIG, Progress
from shiftcost.data.demo import torch_threads
from shiftcost.errors import InputError
from shiftcost.forecast import probe as probing
from shiftcost.forecast import protocol
from shiftcost.forecast.probe import DEFAULT_MAX_HOLDOUT
from shiftcost.recipe import RetrainConfig
from shiftcost.shifts import DEFAULT_SWEEP, corrupt


#: Calibration's probes stop at their first evaluation that meets the cutoff (stage 1 reads that
#: crossing); the sweep's settings record it, and later probes repeat it.
PROBES_STOP_AT_CUTOFF = True
#: What a point takes from the index report, under the same names.
REPORT_COLUMNS: tuple[str, ...] = (
    "resque_dist", "inv_ari", "layer_shift", "preindex_p", "accuracy", "mean_loss", "mean_entropy", "mean_confidence", "reference_accuracy",
)


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
    threads: int | None = None,
    probe: bool = True,
    probe_seconds: float = 3.0,
    level: float = 0.90,
    features: Sequence[str] = COST_FEATURES,
    reference_stats: Any = None,
    progress: Progress | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    time_budget_s: float | None = None,
    fit_intensities: bool = False,
    **retrain_settings: Any,
) -> SweepResult:
    """Run a calibration sweep of ``model`` and evaluate how well the indices predict the cost.

    ``reference_x, reference_y``: the labelled reference data (its summary feeds the indices,
    and the model's accuracy on it minus the tolerance is the target; ``reference_stats``
    reuses a stored summary). ``new_x, new_y``: the labelled new data that every point
    corrupts and retrains on. ``sweep`` maps a corruption kind to its intensities (include 0).
    Each point is retrained ``repeats`` times with seeds ``seed, seed + 1, ...`` (split,
    shuffling); the corruption itself uses ``seed``.

    Retraining: ``config`` (default :data:`SWEEP_CONFIG` with the model file's recipe),
    changed by flat names in ``retrain_settings`` (``lr=``, ``max_epochs=``, ``device=`` ...;
    see :meth:`~shiftcost.recipe.RetrainConfig.replace`), drives every run through
    :func:`~shiftcost.retrain.retrain_to_cutoff`, so the sweep measures the recipe the
    model's retrains use; holdout, cadence and cap default to :mod:`shiftcost.forecast.protocol`.
    ``threads`` sets torch's CPU threads for the sweep (restored afterwards). ``None`` leaves
    them, so the sweep trains at the count ``shiftcost retrain`` and the pipeline use, which the
    host energy rate it fits holds for. A small model on a busy machine may train faster at 1,
    where intra-op threads spin against other processes; its retrains should then run at 1 too.
    ``probe`` measures joules per sample-epoch with the hardware probe for at least
    ``probe_seconds``; ``probe_steps`` > 0 also runs the learning probe
    (:func:`shiftcost.forecast.probe.run_probe`) on every point, calibrating the forecast's
    probe stage. ``features`` and ``level``: the cost model's inputs and interval coverage.
    ``progress(done, total, label)`` is called before the first point and after each one;
    with ``out_dir`` the outputs are written there (see :meth:`SweepResult.write`).
    With ``time_budget_s`` the points are taken round-robin over the kinds (every kind's
    first intensity, then every kind's second, ...) and the sweep stops before a point that
    would likely end past the budget, so a short budget still covers every kind.
    ``fit_intensities`` first stretches each built-in kind's intensities to the model
    (:func:`~shiftcost.calibrate.ladder.fit_sweep`, forward passes only, inside the time
    budget); what it found is kept in the settings as ``fitted_intensities``.
    """
    from shiftcost.index.engine import assess

    config = (config or SWEEP_CONFIG.for_model(spec)).replace(**retrain_settings).replace(require_energy=False)
    _check_data(reference_x, reference_y, "the reference data")
    _check_data(new_x, new_y, "the new data")
    plan = _check_plan(sweep, new_x)
    _check_settings(repeats, threads, level, features)
    started = {"wall": time.perf_counter(), "cpu": _cpu_seconds(), "load": _load_average()}
    fits = None
    if fit_intensities:
        with torch_threads(threads):
            sweep, fits = fit_sweep(model, new_x, new_y, sweep, num_classes=spec.num_classes, seed=seed, device=_resolve_device(config.device))
        plan = _check_plan(sweep, new_x)
    plan = _round_robin(plan) if time_budget_s is not None else plan
    settings = _sweep_settings(config, sweep, seed, repeats, probe_steps, threads, level, features, spec)
    if fits is not None:
        settings["fitted_intensities"] = [fit.to_dict() for fit in fits]
    settings |= {"reference_samples": int(len(reference_y)), "new_samples": int(len(new_y)), "time_budget_s": time_budget_s}
    rows: list[dict[str, Any]] = []
    probe_result: dict[str, Any] | None = None
    with torch_threads(threads):
        reference_stats, retrain_kwargs = _prepare_retrains(model, spec, reference_x, reference_y, reference_stats, config, seed, settings)
        point = partial(
            _run_point, model, spec, reference_stats, new_x, new_y,
            seed=seed, repeats=repeats, retrain_kwargs=retrain_kwargs, assess=assess, probe_steps=probe_steps,
        )
        _run_points(plan, point, rows, settings, started["wall"], time_budget_s, progress, out_dir)
        if probe:
            probe_result = _probe(model, spec, new_x, new_y, seed, config, probe_seconds)

    result = analyse(rows, settings=settings, probe=probe_result, level=level, features=features)
    result.label_free = label_free_analysis(rows, level)
    result.timing = _timing(started, rows, threads)
    if out_dir is not None:
        result.write(out_dir)
    return result


def _prepare_retrains(
    model: nn.Module,
    spec: Any,
    reference_x: torch.Tensor,
    reference_y: torch.Tensor,
    reference_stats: Any,
    config: RetrainConfig,
    seed: int,
    settings: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The reference summary (computed unless given) and the arguments every retrain takes;
    refuses a reference accuracy near chance, which leaves no cutoff to retrain to."""
    from shiftcost.index.engine import compute_reference_stats

    if reference_stats is None:
        reference_stats = compute_reference_stats(model, spec, reference_x, reference_y, device=config.device, seed=seed)
    reference_accuracy = reference_stats.accuracy
    protocol.check_above_chance(reference_accuracy, getattr(spec, "num_classes", None), config.cutoff.tolerance, "the reference data")
    settings["reference_accuracy"] = reference_accuracy
    settings["device"] = str(_resolve_device(config.device))
    replay = config.recipe.replay_with(True) > 0
    return reference_stats, dict(
        config=config,
        reference_x=reference_x if replay else None,
        reference_y=reference_y if replay else None,
        reference_accuracy=reference_accuracy,
    )


def _timing(started: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], threads: int | None) -> dict[str, Any]:
    """What the sweep cost this machine, and how busy the machine was meanwhile."""
    return {
        "wall_s": time.perf_counter() - started["wall"],
        "cpu_s": _cpu_seconds() - started["cpu"],
        "load_average_start": started["load"],
        "load_average_end": _load_average(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "points": len(rows),
        "points_measured": sum(1 for row in rows if not row.get("copy_of")),
        "retrain_runs": sum(len(row.get("runs", [])) for row in rows if not row.get("copy_of")),
    }


def _sweep_settings(
    config: RetrainConfig,
    sweep: Mapping[str, Sequence[float]],
    seed: int,
    repeats: int,
    probe_steps: int,
    threads: int | None,
    level: float,
    features: Sequence[str],
    spec: Any,
) -> dict[str, Any]:
    """The settings a sweep records beside its rows."""
    recipe, cutoff, caps = config.recipe, config.cutoff, config.caps
    scalings = probing.calibration_scalings(recipe.optimizer)
    return {
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
        "probe_stops_at_cutoff": PROBES_STOP_AT_CUTOFF,
        "probe_max_holdout": DEFAULT_MAX_HOLDOUT,
        # The rows' probe until the analysis keeps the scaling its kinds forecast better.
        "probe_rate_scaling": scalings[0],
        "probe_rate_scalings": list(scalings),
        "retrain": config.to_dict(),
        # The count trained at, not the option: a rate refitted from points.json elsewhere needs it.
        "threads": threads if threads is not None else torch.get_num_threads(),
        "level": level,
        "features": list(features),
        "architecture": getattr(spec, "architecture", None),
        "input_shape": getattr(spec, "shape_key", None),
    }


def _run_points(
    plan: list[tuple[str, float]],
    point: Callable[[str, float], dict[str, Any]],
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    started_wall: float,
    time_budget_s: float | None,
    progress: Progress | None,
    out_dir: str | os.PathLike[str] | None,
) -> None:
    """Run the planned points into ``rows``, stopping before one likely to end past the time
    budget; an interrupt keeps (and writes) the rows done so far."""
    if progress is not None:
        fitted = settings.get("fitted_intensities")
        progress(0, len(plan), f"starting; intensities fitted to the model: {describe_fits(fitted)}" if fitted else "starting")
    clean: dict[str, Any] | None = None
    # Round-robin goes from mild to strong shifts, so points get longer as the sweep goes on:
    # the longest point so far, not the mean, is the estimate of the next one.
    longest = 0.0
    try:
        for done, (kind, intensity) in enumerate(plan, start=1):
            spent = time.perf_counter() - started_wall
            if time_budget_s is not None and longest and spent + longest > time_budget_s:
                settings["stopped_early"] = f"time budget of {time_budget_s:g} s: {len(rows)} of {len(plan)} points"
                break
            if intensity == 0 and clean is not None:
                row = _clean_copy(clean, kind)
            else:
                point_started = time.perf_counter()
                row = point(kind, intensity)
                longest = max(longest, time.perf_counter() - point_started)
                if intensity == 0 and row["status"] != "failed":
                    clean = row
            rows.append(row)
            if progress is not None:
                progress(done, len(plan), f"{kind} {intensity:g}: {row['status']}")
    except KeyboardInterrupt as interrupt:
        if out_dir is not None and rows:
            _write_partial(Path(out_dir), rows)
        where = f"; they are in {out_dir}" if out_dir is not None and rows else ""
        raise SweepInterrupted(f"sweep interrupted after {len(rows)} of {len(plan)} points{where}", rows) from interrupt


def _clean_copy(clean: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Intensity 0 leaves the batch as it is whatever the kind, so every kind's clean point is
    the same measurement (same batch, same seeds): it is taken once and copied, which spares
    a retrain per kind and keeps one clean row per kind for the per-kind analysis."""
    row = deepcopy(dict(clean))
    row["corruption"] = kind
    row["notes"] = [*row.get("notes", []), f"the clean batch, measured once under {clean['corruption']} 0"]
    row["copy_of"] = clean["corruption"]
    return row


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
        row.update({name: getattr(report, name) for name in REPORT_COLUMNS})
        row["index_seconds"] = report.seconds
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
    """The learning probe's features and cost on this point (what the forecast will see), under
    each of :func:`~shiftcost.forecast.probe.calibration_scalings` in ``row["probes"]``; the
    row's own fields hold the first until the analysis chooses (``analysis.choose_rate_scaling``)."""
    from shiftcost.forecast.probe import probe_features, run_probe, saved_curve, starts_at_target

    config = retrain_kwargs["config"]
    reference = retrain_kwargs["reference_accuracy"]
    target = max(0.0, reference - config.cutoff.tolerance)
    cap = config.caps.max_epochs or protocol.MAX_EPOCHS
    recipe = config.recipe
    row["probes"] = {}
    for scaling in probing.calibration_scalings(recipe.optimizer):
        trajectory = run_probe(
            model, x, y, target_accuracy=target, ceiling=reference, steps=steps, lr=recipe.lr, optimizer=recipe.optimizer,
            weight_decay=recipe.weight_decay, momentum=recipe.momentum,
            holdout_fraction=config.cutoff.holdout_fraction, seed=seed, device=config.device, retrain_batch_size=recipe.batch_size,
            stop_at_cutoff=PROBES_STOP_AT_CUTOFF, max_holdout=DEFAULT_MAX_HOLDOUT, rate_scaling=scaling,
        )
        seen = probe_features(
            trajectory.epochs, trajectory.accuracy, trajectory.loss, target=target, ceiling=reference, cap_epochs=cap,
            bn_adapted_accuracy=trajectory.bn_adapted_accuracy,
        )
        seen["probe_bn_adapted_accuracy"] = trajectory.bn_adapted_accuracy
        seen["probe_sample_gradients"] = trajectory.cost.sample_gradients
        seen["probe_seconds"] = trajectory.cost.seconds
        seen["probe_already_met"] = starts_at_target(trajectory.accuracy, target)
        # What the probe saw, beside each retrain's curve: the probe's features can be derived again
        # from a saved calibration (how forecast_selection.py compares ways of reading the curve).
        seen["probe_curve"] = saved_curve(trajectory.epochs, trajectory.accuracy, trajectory.loss)
        row["probes"][scaling] = seen
    row.update(next(iter(row["probes"].values())))


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
    model: nn.Module, spec: Any, x: torch.Tensor, y: torch.Tensor, seed: int, config: RetrainConfig, seconds: float
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
            batch_size=config.recipe.batch_size,
            seed=seed,
            device=config.device,
            country_iso_code=config.energy.country_iso_code,
            energy_options=dict(config.energy.options or {}),
        )
        return result.to_dict()
    except Exception as error:  # noqa: BLE001 - the probe is a cross-check; its failure is reported
        return {"error": f"{type(error).__name__}: {error}"}
