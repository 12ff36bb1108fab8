"""``shiftcost retrain`` and ``shiftcost probe-energy``: measured retraining and its unit cost.

``shiftcost retrain`` fine-tunes a model on a labelled batch until held-out accuracy is
back at the target, measures steps, epochs, kWh and kg CO2e, and writes the new model.
``shiftcost probe-energy`` measures joules per training sample-epoch of a model on this
machine, the unit that turns predicted epochs into predicted energy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import make_console
from shiftcost.cli._threads import ThreadsOption, at_torch_threads
from shiftcost.config import MAX_PROBE_SHARE

if TYPE_CHECKING:
    from rich.console import Console

    from shiftcost.retrain import EvalPoint, RetrainResult

# Exit status of `shiftcost retrain` when the step/epoch cap ended the run before the cutoff.
EXIT_CAP_REACHED = 3
# Exit status when the budget guard stopped the run (no model written).
EXIT_STOPPED_BY_BUDGET = 4

ModelOption = Annotated[
    Path, typer.Option("--model", "-m", help="Model file (.safetensors or .pt) written by shiftcost.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]
CountryOption = Annotated[
    str, typer.Option("--country", help="3-letter ISO code of the grid the machine draws from (carbon intensity).")
]
RegionOption = Annotated[
    str | None, typer.Option("--region", help="Region within the country (US states, Canadian provinces).", show_default=False)
]
TrackingOption = Annotated[
    str, typer.Option("--tracking-mode", help="process: this process's CPU/RAM only; machine: the whole machine.")
]


RecipeFileOption = Annotated[
    Path | None,
    typer.Option("--recipe", help="TOML file with a [recipe] table (and optionally [cutoff], [caps]); flags override it.", show_default=False),
]
OptimizerOption = Annotated[str | None, typer.Option("--optimizer", help="adam, adamw or sgd (default: the model's recipe, else adam).", show_default=False)]
LrOption = Annotated[float | None, typer.Option("--lr", min=0.0, help="Learning rate (default: the model's recipe, else 1e-4).", show_default=False)]
WeightDecayOption = Annotated[float | None, typer.Option("--weight-decay", min=0.0, help="Weight decay.", show_default=False)]
ScheduleOption = Annotated[str | None, typer.Option("--schedule", help="Learning-rate schedule: constant, cosine or step.", show_default=False)]
BatchSizeOption = Annotated[int | None, typer.Option("--batch-size", min=1, help="Training mini-batch size (default 64).", show_default=False)]
AugmentOption = Annotated[
    list[str] | None,
    typer.Option("--augment", help="torchvision transforms v2 name, e.g. RandomHorizontalFlip or 'RandomCrop(32, padding=4)' (repeatable).", show_default=False),
]
ReplayOption = Annotated[
    float | None, typer.Option("--replay-fraction", min=0.0, max=0.95, help="Share of each epoch's pool drawn from the reference batch.", show_default=False)
]
FreezeBnOption = Annotated[
    bool | None, typer.Option("--freeze-batchnorm/--train-batchnorm", help="Keep batch-norm statistics fixed while fine-tuning.", show_default=False)
]
TrainStepOption = Annotated[
    str | None, typer.Option("--train-step", help="Your own training step pkg.module:step, called as step(model, inputs, labels) -> loss.", show_default=False)
]


BatchOption = Annotated[
    Path, typer.Option("--batch", "-b", help="Labelled batch: ImageFolder directory, .npz or .pt.", show_default=False)
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Where to write the retrained model (.safetensors or .pt).", show_default=False)]
ReferenceOption = Annotated[
    Path | None,
    typer.Option(
        "--reference",
        "-r",
        help="Labelled reference batch: sets the target (its accuracy minus --tolerance) and feeds --replay-fraction.",
        show_default=False,
    ),
]
TargetAccuracyOption = Annotated[
    float | None, typer.Option("--target-accuracy", min=0.0, max=1.0, help="Held-out accuracy to reach.", show_default=False)
]
ReferenceAccuracyOption = Annotated[
    float | None,
    typer.Option("--reference-accuracy", min=0.0, max=1.0, help="Known reference accuracy; target = it minus --tolerance.", show_default=False),
]
ToleranceOption = Annotated[
    float | None, typer.Option("--tolerance", min=0.0, max=0.99, help="Accuracy drop accepted below the reference (default 0.03).", show_default=False)
]
HoldoutOption = Annotated[
    float | None, typer.Option("--holdout-fraction", min=0.01, max=0.9, help="Share of the batch held out to judge the cutoff (default 0.3, the measurement protocol's).", show_default=False)
]
EvalEveryOption = Annotated[
    int | None, typer.Option("--eval-every", min=1, help="Optimizer steps between evaluations (default: a quarter epoch).", show_default=False)
]
MaxStepsOption = Annotated[int | None, typer.Option("--max-steps", min=1, help="Step cap.", show_default=False)]
MaxEpochsOption = Annotated[float | None, typer.Option("--max-epochs", min=0.01, help="Epoch cap, fractions allowed (default 15, calibration's).", show_default=False)]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for the split, shuffling and dropout.")]
NoEnergyOption = Annotated[bool, typer.Option("--no-energy", help="Do not measure energy (no CodeCarbon).")]
EmissionsCsvOption = Annotated[
    Path | None, typer.Option("--emissions-csv", help="Also append CodeCarbon's own row to emissions.csv in this directory (its CPU figure is the one it sampled, which can differ from the one printed: see the README's energy section).", show_default=False)
]
CostModelOption = Annotated[
    Path | None,
    typer.Option("--cost-model", help="forecaster.json from shiftcost calibrate (or the costmodel.json beside it, or their directory): guards --budget-kwh during the run.", show_default=False),
]
BudgetKwhOption = Annotated[
    float | None,
    typer.Option("--budget-kwh", min=0.0, help="Stop (status stopped_by_budget, no model written) once the forecast's lower bound no longer fits.", show_default=False),
]
ReferenceStatsOption = Annotated[
    Path | None,
    typer.Option(
        "--reference-stats",
        help="Reference statistics: their accuracy is the reference accuracy when no other is given, and the guard's forecast before the run "
        "starts from their indices (then from a probe, when the cost model has a probe stage its calibration found worth running and the probe pays for itself against the budget).",
        show_default=False,
    ),
]
ProbeMaxShareOption = Annotated[
    float,
    typer.Option(
        "--probe-max-share", min=0.0, max=1.0,
        help="With the guard: probe only when the probe costs at most this share of --budget-kwh (as the pipeline's probe_max_share).",
    ),
]
NoProbeOption = Annotated[
    bool,
    typer.Option("--no-probe", help="With the guard: start from the index forecast alone, without the probe the cost model was calibrated with."),
]



def retrain_config(base: Any, spec: Any, recipe_file: Path | None, **flags: Any) -> Any:
    """``base`` with the model file's recipe, then the recipe file, then the flags given."""
    config = base.for_model(spec)
    if recipe_file is not None:
        config = config.with_file(recipe_file)
    return config.replace(**{name: (tuple(value) if isinstance(value, list) else value) for name, value in flags.items() if value is not None})


def _energy_options(region: str | None, tracking_mode: str, emissions_csv: Path | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"tracking_mode": tracking_mode}
    if region:
        options["region"] = region
    if emissions_csv is not None:
        from shiftcost.errors import InputError

        if not emissions_csv.is_dir():
            raise InputError(f"--emissions-csv {emissions_csv} is not a directory; create it or name an existing one.")
        options.update(save_to_file=True, output_dir=str(emissions_csv))
    return options


class _Progress:
    """A rich bar over optimizer steps, updated at each evaluation."""

    def __init__(self, console: Console, guard: Any = None) -> None:
        self._guard = guard
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("retraining"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[acc]:.3f} / target {task.fields[target]:.3f}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> _Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()

    def __call__(self, point: EvalPoint, step_cap: int, target: float) -> str | None:
        if self._task is None:
            self._task = self._bar.add_task("retrain", total=step_cap, acc=point.accuracy, target=target)
        self._bar.update(self._task, completed=point.step, acc=point.accuracy)
        return None if self._guard is None else self._guard(point, step_cap, target)


def _budget_guard(
    net: Any, spec: Any, new: Any, ref_x: Any, ref_y: Any, cost_model: Path | None, budget_kwh: float | None,
    reference_stats: Path | None, reference_accuracy: float | None, config: Any, device: str, probe: bool, source: str,
    probe_max_share: float,
) -> Any:
    """The budget guard for this run, with a forecast before the run when reference stats are given.

    That forecast is the probe stage's when the cost model has one its calibration found
    worth running (unless ``probe`` is False) and, as in the pipeline, the probe pays
    (:func:`~shiftcost.forecast.decide.probe_pays`: the index forecast's interval in kWh
    straddles the budget and the probe would cost at most ``probe_max_share`` of it). The probe
    runs as calibration ran it, and its cost is charged to the budget before the run's first
    step. Otherwise it is the index forecast, and ``guard.probe_advice`` says why.

    It prices every epoch still to come at the pool the run trains on: the training split of
    the batch plus the reference samples the recipe replays.
    """
    from shiftcost.errors import InputError

    if cost_model is None or budget_kwh is None:
        raise InputError("the budget guard needs both --cost-model and --budget-kwh; give both or neither.")
    import torch

    from shiftcost.cli.forecast import rate_mismatch_note, run_calibrated_probe
    from shiftcost.forecast import protocol
    from shiftcost.forecast.decide import probe_pays
    from shiftcost.forecast.forecaster import Forecaster, missing_energy_rate
    from shiftcost.forecast.guard import BudgetGuard
    from shiftcost.retrain import _evaluate

    forecaster = Forecaster.load(cost_model)
    if forecaster.energy_rate is None:
        raise InputError(missing_energy_rate(cost_model, "a budget in kWh cannot be guarded"))
    forecaster.check_model(spec, "this model file")
    has_reference = ref_x is not None and ref_y is not None
    forecaster.check_retrain(
        config, "this retrain (its recipe options and file, and the model file's recipe)",
        reference_available=has_reference, reference_option="--reference DATA",
    )
    note = rate_mismatch_note(forecaster.energy_rate, device)
    if note:
        make_console(stderr=True).print(note, style="yellow")
    features = None
    ceiling = reference_accuracy
    if reference_stats is not None:
        from shiftcost.index.engine import assess
        from shiftcost.index.reference import ReferenceStats

        stats = ReferenceStats.load(reference_stats, model=net)
        report = assess(net, spec, stats, new.x, new.y, device=device)
        features = {n: float(getattr(report, n)) for n in forecaster.stage0.features_ if getattr(report, n, None) is not None}
        ceiling = ceiling if ceiling is not None else stats.accuracy
    if ceiling is None and ref_x is not None:
        ceiling, _ = _evaluate(net, ref_x, ref_y, next(net.parameters()).device, 512)
    if ceiling is None:
        raise InputError("the budget guard needs the reference accuracy: give --reference, --reference-accuracy or --reference-stats.")
    protocol.check_above_chance(ceiling, spec.num_classes, config.cutoff.tolerance, "the reference")
    replay = config.recipe.replay_with(has_reference)
    guard = BudgetGuard(
        forecaster, budget_kwh=float(budget_kwh), batch_samples=len(new.y), ceiling=ceiling, features=features,
        holdout_fraction=config.cutoff.holdout_fraction, replay_fraction=replay, reference_samples=0 if ref_x is None else len(ref_x),
        cap_epochs=config.caps.max_epochs,
    )
    if features is not None:
        guard.initial = forecaster.predict(features)
        if probe and forecaster.stage1 is not None:
            price = guard.price
            not_worth = forecaster.probe_not_worth()
            advice = None if not_worth else probe_pays(
                guard.initial.epochs.map(price.kwh), guard.budget_kwh, price.probe_kwh(forecaster.probe_options()), probe_max_share
            )
            guard.probe_advice = not_worth or advice.reason
            if not_worth or not advice.probe:
                make_console(stderr=True).print(f"no probe: {guard.probe_advice}; the guard starts from the index forecast.", style="yellow")
            else:
                guard.probe = run_calibrated_probe(
                    forecaster, net, new, ceiling, config.cutoff.tolerance, None, config.seed, device, source,
                    config.energy.track, config.energy.country_iso_code,
                )
                # Priced through the host rate, as every step of the run is.
                guard.spent_before_kwh = guard.probe.cost.estimated_energy_kwh
                guard.initial = forecaster.predict(features, probe=guard.probe)
    return guard


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _result_table(result: RetrainResult, out: Path | None) -> Any:
    from rich.table import Table

    table = Table(title=f"retrain: {result.status}", show_header=False)
    table.add_column("measure", style="bold")
    table.add_column("value")
    rows = [
        ("cutoff reached", "yes" if result.reached_cutoff else "NO"),
        ("accuracy (initial -> final / target)", f"{_fmt(result.initial_accuracy, '.3f')} -> {_fmt(result.final_accuracy, '.3f')} / {result.target_accuracy:.3f}"),
        ("steps / epochs", f"{result.steps} / {result.epochs:.2f}  (cap {result.max_steps} steps)"),
        ("samples (train + replay / holdout)", f"{result.train_samples} + {result.replay_samples} / {result.holdout_samples}"),
        ("mean gradient norm", _fmt(result.mean_grad_norm)),
        ("parameter change ||dθ||/√n", _fmt(result.param_change)),
        ("wall time (train / eval)", f"{result.wall_time_s:.2f} s ({result.train_time_s:.2f} / {result.eval_time_s:.2f})"),
    ]
    energy = result.energy
    if energy is not None:
        rows += [
            ("energy", f"{energy.energy_kwh:.4g} kWh (CPU {energy.cpu_energy_kwh:.3g}, GPU {energy.gpu_energy_kwh:.3g}, RAM {energy.ram_energy_kwh:.3g})"),
            ("emissions", f"{energy.emissions_kg:.4g} kg CO2e at {_fmt(energy.carbon_intensity_kg_per_kwh, '.3f')} kg/kWh ({energy.country_iso_code})"),
            ("how measured", f"CPU {energy.cpu_method}; GPU {energy.gpu_method}; RAM {energy.ram_method}"),
            ("hardware", f"{energy.cpu_model}" + (f"; {energy.gpu_model}" if energy.gpu_model else "")),
        ]
    else:
        rows.append(("energy", result.energy_error or "not tracked"))
    if out is not None:
        rows.append(("new model", str(out)))
    for name, value in rows:
        table.add_row(name, value)
    return table


def retrain(
    model: ModelOption,
    batch: BatchOption,
    out: OutOption,
    reference: ReferenceOption = None,
    target_accuracy: TargetAccuracyOption = None,
    reference_accuracy: ReferenceAccuracyOption = None,
    tolerance: ToleranceOption = None,
    holdout_fraction: HoldoutOption = None,
    eval_every: EvalEveryOption = None,
    max_steps: MaxStepsOption = None,
    max_epochs: MaxEpochsOption = None,
    recipe: RecipeFileOption = None,
    optimizer: OptimizerOption = None,
    lr: LrOption = None,
    weight_decay: WeightDecayOption = None,
    schedule: ScheduleOption = None,
    batch_size: BatchSizeOption = None,
    augment: AugmentOption = None,
    replay_fraction: ReplayOption = None,
    freeze_batchnorm: FreezeBnOption = None,
    train_step: TrainStepOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    country: CountryOption = "USA",
    region: RegionOption = None,
    tracking_mode: TrackingOption = "process",
    no_energy: NoEnergyOption = False,
    emissions_csv: EmissionsCsvOption = None,
    cost_model: CostModelOption = None,
    budget_kwh: BudgetKwhOption = None,
    reference_stats: ReferenceStatsOption = None,
    no_probe: NoProbeOption = False,
    probe_max_share: ProbeMaxShareOption = MAX_PROBE_SHARE,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune a model on a labelled batch until held-out accuracy reaches the target.

    Evaluates every --eval-every steps on a held-out part of the batch and stops at the first evaluation at or above the target, or at the step/epoch cap. Measures energy and emissions with CodeCarbon (offline; nothing written unless --emissions-csv). The training recipe is the model file's own (set at `shiftcost model import --recipe`), then --recipe FILE, then the flags.

    With --cost-model and --budget-kwh a guard updates the forecast at every evaluation and stops the run when what is spent plus the forecast's lower bound exceeds the budget; the model is then left unchanged. With --reference-stats the forecast before the run is the probe stage's (its cost counted as spent) when the cost model has one, its calibration forecast better with it, and, as in the pipeline, the probe can change the guard's first verdict (the index forecast's interval straddles the budget) and costs at most --probe-max-share of the budget; else the index forecast, and stderr says why.

    Exit status: 0 when the target was reached (or already met), 3 when the cap ended the run first (the model is still written), 4 when the budget guard stopped it (no model written), 1 when the run failed.
    """
    from shiftcost.data.models import load_model, save_model
    from shiftcost.recipe import RetrainConfig

    err = make_console(stderr=True)
    net, spec = load_model(model)
    config = retrain_config(
        RetrainConfig(), spec, recipe,
        tolerance=tolerance, holdout_fraction=holdout_fraction, eval_every=eval_every, max_steps=max_steps,
        max_epochs=max_epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
        batch_size=batch_size, augment=augment, replay_fraction=replay_fraction, freeze_batchnorm=freeze_batchnorm,
        train_step=train_step, seed=seed, device=device, country_iso_code=country, track_energy=not no_energy,
        energy_options=_energy_options(region, tracking_mode, emissions_csv),
    )
    new, ref_x, ref_y = _load_batches(batch, reference, spec)
    guard = None
    if cost_model is not None or budget_kwh is not None:
        guard = _budget_guard(
            net, spec, new, ref_x, ref_y, cost_model, budget_kwh, reference_stats, reference_accuracy, config, device, not no_probe, str(batch),
            probe_max_share,
        )
    if target_accuracy is None and reference_accuracy is None and reference is None:
        # The guard has read it from --reference-stats already.
        reference_accuracy = guard.ceiling if guard is not None else _stats_accuracy(reference_stats, net)
    result = _retrain_showing_progress(
        err, guard, as_json, net, new.x, new.y, config, reference_x=ref_x, reference_y=ref_y,
        target_accuracy=target_accuracy, reference_accuracy=reference_accuracy, source=str(batch),
    )
    stopped = result.status == "stopped_by_budget"
    saved = None if stopped else save_model(result.model.cpu(), spec, out)
    if as_json:
        payload = _result_payload(result, guard)
        payload.update(model=str(model), batch=str(batch), out=None if saved is None else str(saved))
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_outcome(err, result, guard, saved)
    if result.status == "cap_reached":
        raise typer.Exit(EXIT_CAP_REACHED)
    if stopped:
        raise typer.Exit(EXIT_STOPPED_BY_BUDGET)


def _stats_accuracy(reference_stats: Path | None, net: Any) -> float:
    """The reference accuracy the stored statistics record: the target's base when nothing else gives one."""
    from shiftcost.errors import InputError

    accuracy = None
    if reference_stats is not None:
        from shiftcost.index.reference import ReferenceStats

        accuracy = ReferenceStats.load(reference_stats, model=net).accuracy
    if accuracy is None:
        raise InputError(
            "the run needs a target accuracy: give --target-accuracy, --reference-accuracy, --reference (labelled reference data) "
            "or --reference-stats computed with labels."
        )
    return float(accuracy)


def _load_batches(batch: Path, reference: Path | None, spec: Any) -> tuple[Any, Any, Any]:
    """The new batch, and the reference batch's images and labels (None without --reference)."""
    from shiftcost.data.batches import check_batch, load_batch

    new = load_batch(batch, spec=spec)
    check_batch(new, spec)
    if reference is None:
        return new, None, None
    ref = load_batch(reference, spec=spec)
    check_batch(ref, spec)
    return new, ref.x, ref.y


def _retrain_showing_progress(err: Console, guard: Any, as_json: bool, *args: Any, **kwargs: Any) -> RetrainResult:
    """:func:`~shiftcost.retrain.retrain_to_cutoff` under a progress bar; a failed run shows its partial cost."""
    from shiftcost.retrain import RetrainError, RetrainInterrupted, retrain_to_cutoff

    progress = _Progress(err, guard)
    try:
        with progress:
            result = retrain_to_cutoff(*args, progress=progress, **kwargs)
        return result if guard is None else guard.explained(result)
    except (RetrainError, RetrainInterrupted) as failure:
        if as_json:
            typer.echo(json.dumps(failure.partial.to_dict(), indent=2))
        else:
            err.print(_result_table(failure.partial, None))
        raise


def _result_payload(result: RetrainResult, guard: Any) -> dict[str, Any]:
    payload = result.to_dict()
    payload.update(energy_kwh=result.energy_kwh, stopped_by_budget=result.status == "stopped_by_budget")
    if guard is not None:
        payload["guard"] = {
            "budget_kwh": guard.budget_kwh,
            "reason": guard.reason,
            "estimated_kwh": guard.spent_kwh,
            "pool_samples": guard.pool,
            "probe": None if guard.probe is None else guard.probe.cost.to_dict(),
            "probe_advice": guard.probe_advice,
            "initial": None if guard.initial is None else guard.initial.epochs.to_dict() | {"stage": guard.initial.stage},
            "measured_kwh": result.energy_kwh,
            "forecasts": guard.forecasts,
        }
    return payload


def _print_outcome(err: Console, result: RetrainResult, guard: Any, saved: Path | None) -> None:
    make_console().print(_result_table(result, saved))
    if guard is not None and guard.initial is not None:
        e = guard.initial.epochs
        probed = "" if guard.probe is None else (
            f" after a probe of {guard.probe.cost.steps} steps ({guard.probe.cost.sample_gradients} sample-gradients, "
            f"{guard.spent_before_kwh:.3g} kWh charged to the budget)"
        )
        err.print(f"the guard started from the {guard.initial.stage} stage's forecast, {e.median:.2f} [{e.low:.2f}, {_fmt(e.high, '.2f')}] epochs{probed}.")
    if result.status == "cap_reached":
        err.print("the cap ended the run before the cutoff: the cost above is a lower bound.", style="yellow")
    if result.status == "stopped_by_budget" and guard is not None:
        err.print(f"stopped by the budget guard: {guard.reason}; the model was left unchanged.", style="yellow")


def probe_energy(
    model: ModelOption,
    samples: Annotated[int, typer.Option("--samples", min=2, help="Synthetic training samples of the model's input shape.")] = 512,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Minimum epochs to run.")] = 2,
    min_seconds: Annotated[float, typer.Option("--min-seconds", min=0.0, help="Minimum measured duration; more epochs run until reached.")] = 3.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Training mini-batch size.")] = 64,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    country: CountryOption = "USA",
    region: RegionOption = None,
    tracking_mode: TrackingOption = "process",
    as_json: JsonOption = False,
) -> None:
    """Measure joules per training sample-epoch of a model on this machine.

    Trains a copy of the model on random inputs of its input shape under CodeCarbon and divides the measured energy by samples x epochs; predicted epochs x samples x this figure is the predicted energy of a retraining on this hardware.
    """
    from shiftcost.data.models import load_model
    from shiftcost.retrain import probe_joules_per_sample_epoch

    net, spec = load_model(model)
    err = make_console(stderr=True)
    with err.status("probing energy per sample-epoch"):
        result = probe_joules_per_sample_epoch(
            net, spec, samples=samples, epochs=epochs, min_seconds=min_seconds, batch_size=batch_size,
            device=device, country_iso_code=country, energy_options=_energy_options(region, tracking_mode),
        )
    if as_json:
        payload = result.to_dict()
        payload["model"] = str(model)
        typer.echo(json.dumps(payload, indent=2))
        return
    make_console().print(_probe_table(result, spec))


def _probe_table(result: Any, spec: Any) -> Any:
    from rich.table import Table

    e = result.energy
    table = Table(title=f"energy probe: {spec.architecture} on {result.hardware}", show_header=False)
    table.add_column("measure", style="bold")
    table.add_column("value")
    for name, value in [
        ("joules per sample-epoch", f"{result.joules_per_sample_epoch:.4g} J"),
        ("seconds per sample-epoch", f"{result.seconds_per_sample_epoch:.4g} s"),
        ("run", f"{result.samples} samples x {result.epochs} epochs, batch {result.batch_size}, {e.duration_s:.2f} s"),
        ("energy", f"{e.energy_kwh:.4g} kWh (CPU {e.cpu_energy_kwh:.3g}, GPU {e.gpu_energy_kwh:.3g}, RAM {e.ram_energy_kwh:.3g})"),
        ("how measured", f"CPU {e.cpu_method}; GPU {e.gpu_method}; RAM {e.ram_method}"),
    ]:
        table.add_row(name, value)
    return table


def register(app: typer.Typer) -> None:
    app.command("retrain")(at_torch_threads(retrain))
    app.command("probe-energy")(at_torch_threads(probe_energy))
