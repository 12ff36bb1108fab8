"""``shiftcost calibrate``: a calibration sweep of known shifts, retrained for real.

With ``--demo`` (the default when no model is given) it trains the digits CNN and sweeps
the digits "stream" split against the "holdout" split as reference. It prints how well
each index correlates with what retraining cost and how well the fitted cost model
predicts an unseen kind of shift, and writes the table, correlations, cost model, report
and plot to ``--out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import make_console
from shiftcost.cli._threads import threads_option
from shiftcost.cli.retrain import (
    AugmentOption,
    BatchSizeOption,
    FreezeBnOption,
    LrOption,
    OptimizerOption,
    RecipeFileOption,
    ReplayOption,
    ScheduleOption,
    TrainStepOption,
    WeightDecayOption,
    retrain_config,
)

if TYPE_CHECKING:
    from rich.console import Console

    from shiftcost.calibrate import SweepResult

DEFAULT_OUT = Path("shiftcost-calibration")

#: Retraining settings of --quick: a smoke test, not a calibration.
QUICK_SETTINGS: dict[str, Any] = {"repeats": 1, "max_epochs": 3.0, "probe_seconds": 0.5}


#: Column headings that keep the correlation tables within 80 columns.
SHORT_MEASURES = {
    "energy_kwh": "energy",
    "emissions_kg": "CO2e",
    "grad_norm": "grad",
    "initial_grad_norm": "grad0",
    "param_change": "dθ",
}


class _SweepProgress:
    """A rich bar over the sweep's points with elapsed time and ETA."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("calibrating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[label]}"),
            console=console,
            transient=True,
        )
        self._console = console
        self._task: Any = None

    def __enter__(self) -> _SweepProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()

    def __call__(self, done: int, total: int, label: str) -> None:
        if self._task is None:
            self._task = self._bar.add_task("sweep", total=total, label=label)
            self._started = time.perf_counter()
        self._bar.update(self._task, completed=done, label=label)
        if not self._console.is_terminal:  # logs and CI: one plain line per point
            elapsed = time.perf_counter() - self._started
            self._console.print(f"calibrating [{done}/{total}] {label} ({elapsed:.0f} s)", highlight=False, soft_wrap=True)


def _fmt(value: Any, spec: str = ".3g") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return format(value, spec)


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.0f}%"


def _print_tables(result: SweepResult, console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    points = Table(title="sweep points (means over repeats)")
    for name in ("corruption", "level", "status", "RESQUE", "acc", "steps", "epochs", "Wh"):
        points.add_column(name, justify="left" if name in ("corruption", "status") else "right")
    for row in result.rows:
        energy = row.get("energy_kwh")
        points.add_row(
            row["corruption"],
            f"{row['intensity']:g}",
            row["status"] if row["status"] != "failed" else Text("failed", style="red"),
            _fmt(row.get("resque_dist"), ".4f"),
            _fmt(row.get("accuracy"), ".3f"),
            _fmt(row.get("steps"), ".1f"),
            _fmt(row.get("epochs"), ".2f"),
            _fmt(None if energy is None else energy * 1000, ".3g"),
        )
    console.print(points)
    if result.settings.get("fitted_intensities"):
        from shiftcost.calibrate.ladder import describe_fits

        console.print(f"intensities fitted to the model (the default ones times): {describe_fits(result.settings['fitted_intensities'])}")
    uninformative = result.uninformative_kinds
    if uninformative["never_retrained"]:
        console.print(
            f"never needed training at any intensity: {', '.join(uninformative['never_retrained'])}; these kinds show the cost "
            "model no cost: sweep them stronger (--sweep kind=intensity,...) or fit the intensities to the model (--fit-intensities).",
            style="yellow",
        )
    if uninformative["capped_throughout"]:
        console.print(
            f"reached the epoch cap at every shifted intensity: {', '.join(uninformative['capped_throughout'])}; these kinds "
            "give only lower bounds: sweep them milder (--sweep kind=intensity,...) or raise --max-epochs.",
            style="yellow",
        )
    clean = [row for row in result.rows if row["intensity"] == 0 and row["status"] != "failed"]
    if clean and all(row.get("censored") for row in clean):
        console.print(
            f"the new data itself (intensity 0) reached the epoch cap, at held-out accuracy {clean[0]['final_accuracy']:.3f} against "
            f"a target of {clean[0]['target_accuracy']:.3f}, so no milder shift gets there either: retrain with the recipe the model "
            "was trained with (`shiftcost model import --recipe`), or calibrate on new data nearer the reference or with a larger --tolerance.",
            style="yellow",
        )
    if result.settings.get("stopped_early"):
        console.print(
            f"sweep stopped early at its {result.settings['stopped_early']}; "
            "give a larger --time-budget (0: none) to sweep every point.",
            style="yellow",
        )

    corr = result.correlations
    measures = corr["measures"]
    for statistic, title in (("spearman", "Spearman rho"), ("pearson", "Pearson r")):
        grid = Table(title=f"{title} of each feature with each cost measure, whole sweep ({corr['n_rows']} points)")
        grid.add_column("feature")
        for measure in measures:
            grid.add_column(SHORT_MEASURES.get(measure, measure), justify="right")
        for feature in corr["features"]:
            cells = corr["overall"][feature]
            grid.add_row(feature, *(_fmt(cells[m][statistic], "+.2f") for m in measures))
        console.print(grid)

    kinds = list(corr["per_type"])
    within = Table(title="Spearman rho with energy within each corruption kind")
    within.add_column("feature")
    for kind in kinds:
        within.add_column(kind, justify="right")
    for feature in corr["features"]:
        within.add_row(feature, *(_fmt(corr["per_type"][k][feature]["energy_kwh"]["spearman"], "+.2f") for k in kinds))
    console.print(within)
    best = result.best_index
    console.print(
        f"best index for energy: {best['best_index_overall']} over the sweep, "
        f"{best['best_index_within_type']} within kinds"
        + (f" (a tie-break: {', '.join(best['within_type_tie'])} tie within kinds)" if best.get("within_type_tie") else "")
    )

    if result.loco is None:
        console.print(f"leave-one-corruption-out not evaluated: {result.loco_error}", style="yellow")
    else:
        summary = result.loco["summary"]
        loco = Table(title=f"cost model, leave one corruption kind out ({summary['level']:.0%} intervals)")
        for name in ("held-out kind", "n", "censored", "MdAPE energy", "coverage energy", "MdAPE epochs", "coverage epochs"):
            loco.add_column(name, justify="left" if name == "held-out kind" else "right")
        groups = dict(summary["per_group"])
        groups["all"] = summary
        for name, g in groups.items():
            loco.add_row(
                name, str(g["n"]), str(g["n_censored"]), _pct(g["mdape_energy"]), _pct(g["coverage_energy"]),
                _pct(g["mdape_epochs"]), _pct(g["coverage_epochs"]),
            )
        console.print(loco)
    _print_probe_stage(result.forecaster, result.loco_stages, console)
    _print_annealing_cap(result.forecaster, console)
    if result.cost_model_error:
        console.print(f"cost model not fitted: {result.cost_model_error}", style="yellow")
    elif result.cost_model_note:
        console.print(f"cost model fitted with {result.cost_model_note}", style="yellow")
    t = result.timing
    j = result.joules_per_sample_epoch
    console.print(
        f"{t['points']} points ({t.get('points_measured', t['points'])} measured), {t['retrain_runs']} retraining runs in {t['wall_s']:.0f} s wall / {t['cpu_s']:.0f} s CPU "
        f"(load average {t.get('load_average_start')} -> {t.get('load_average_end')}); "
        f"J per sample-epoch: probe {_fmt(j.get('probe'), '.3g')}, sweep {_fmt(j.get('sweep'), '.3g')}"
    )
    for failed in result.failed:
        console.print(f"failed point {failed['corruption']} {failed['intensity']:g}: {failed['error']}", style="red")
    if result.files:
        console.print(f"written to {Path(result.files['report']).parent}: " + ", ".join(Path(p).name for p in result.files.values()))


def _print_annealing_cap(forecaster: Any, console: Console) -> None:
    """Say so when the forecasts hold only at a cap other than the one retrains take by default
    (a cost model keeps its cap only where the cosine schedule anneals over it: ``ONLY_UNDER``)."""
    from shiftcost.recipe import Caps

    calibrated = (forecaster.retrain_settings if forecaster is not None else {}).get("max_epochs")
    default = Caps().max_epochs
    if calibrated is not None and calibrated != default:
        console.print(
            f"the cosine schedule anneals over the run's cap, so these forecasts hold for retrains capped at {calibrated:g} epochs; "
            f"retrain and the pipeline cap at {default:g} by default: pass retrain --max-epochs {calibrated:g} "
            f"(SHIFTCOST_RETRAIN_MAX_EPOCHS={calibrated:g}), or calibrate with --max-epochs {default:g}.",
            style="yellow",
        )


def _print_probe_stage(forecaster: Any, stages: Mapping[str, Any] | None, console: Console) -> None:
    """Both stages' leave-one-kind-out error on the batches that needed training, as ``forecast``
    makes them, and whether the saved forecaster will probe on their strength."""
    from shiftcost.calibrate.outputs import describe_rate_scaling
    from shiftcost.forecast.forecaster import naive_did_better

    if forecaster is None or (forecaster.stage1 is None and not forecaster.stage1_error):
        return
    if forecaster.stage1 is None:
        console.print(f"probe stage not fitted: {forecaster.stage1_error}", style="yellow")
        return
    if stages is not None and "error" in stages:
        console.print(f"forecast stages not compared on the batches that needed training: {stages['error']}", style="yellow")
    elif stages is not None:
        probe, index, naive = stages["probe"], stages["index"], stages["constant"]

        def scores(stage: Mapping[str, Any]) -> str:
            # Each stage is scored on the kinds it could be fitted without, so each says on how many batches.
            return (
                f"{_pct(stage['mdape_epochs'])}, {_fmt(stage['mean_abs_log_error'], '.2f')}, {_pct(stage['coverage_epochs'])}, "
                f"{stage['censored_definite_misses']} (of {stage['n']}, {stage['n_censored']} capped)"
            )

        held = set(forecaster.stage1.offset_features or ())
        read = ", ".join(f"{name} held at slope 1" if name in held else name for name in forecaster.stage1.features_)
        unfitted = stages.get("kinds_not_fitted") or []
        console.print(
            f"probe stage ({read}), leave one corruption kind out, on the batches that needed training: MdAPE epochs, "
            "mean |log error| (capped as bounds), coverage epochs of those that reached the cutoff, capped ones that spent "
            f"more than the upper end {scores(probe)}; index stage: {scores(index)}; the other kinds' median epochs (naive): {scores(naive)}"
            + (f"; no probe stage could be fitted with {' or '.join(unfitted)} left out, so its figures leave {'that kind' if len(unfitted) == 1 else 'those kinds'} out"
               if unfitted else "")
            + f". The probe's first evaluation put {stages['needing_none_forecast_at_zero']} of the {stages['needing_none']} that needed none at zero."
        )
        if "rate_scaling" in stages:
            console.print(f"{describe_rate_scaling(stages['rate_scaling'])}.")
        beaten = naive_did_better(stages)
        if beaten:
            console.print(f"{beaten}; calibrating on more kinds or intensities may change that.", style="yellow")
    reason = forecaster.probe_not_worth()
    if reason:
        console.print(
            f"{reason}: forecast, retrain --cost-model and the pipeline will not probe with this cost model "
            "(forecast --probe-steps N probes anyway); calibrating on more kinds or intensities may change that.",
            style="yellow",
        )


def _summary_json(result: SweepResult) -> dict[str, Any]:
    """The JSON printed by --json: everything but the runs' and the probe's evaluation curves (in sweep.json)."""
    full = result.to_dict()
    full["rows"] = [{k: v for k, v in row.items() if k not in ("runs", "probe_curve")} for row in full["rows"]]
    for key in ("loco", "loco_probe"):
        if full.get(key) is not None:
            full[key] = {"summary": full[key]["summary"], "points": full[key]["points"]}
    return full


def _parse_sweep(items: list[str]) -> dict[str, tuple[float, ...]]:
    from shiftcost.errors import InputError

    plan: dict[str, tuple[float, ...]] = {}
    for item in items:
        kind, _, values = item.partition("=")
        try:
            plan[kind.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise InputError(f"--sweep {item!r} must be kind=intensity,intensity,... e.g. gaussian_noise=0,0.3,0.6.") from None
        if not plan[kind.strip()]:
            raise InputError(f"--sweep {item!r} names no intensities; write kind=intensity,intensity,...")
    return plan


def _pick(option: str, given: str, known: Any) -> list[str]:
    """The comma-separated names of ``given``; one sentence when any is unknown or none is named."""
    from shiftcost.errors import InputError

    wanted = [name.strip() for name in given.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise InputError(f"{option} names unknown {option[2:]} {unknown or given!r}; choose from {', '.join(known)}.")
    return wanted


def _choose_plan(sweep: list[str] | None, quick: bool, kinds: str | None) -> dict[str, tuple[float, ...]]:
    """The kinds and intensities to sweep: --sweep, else the quick or the default sweep, narrowed by --kinds."""
    from shiftcost.calibrate import QUICK_SWEEP
    from shiftcost.shifts import DEFAULT_SWEEP

    base = _parse_sweep(sweep) if sweep else QUICK_SWEEP if quick else DEFAULT_SWEEP
    if kinds is None:
        return dict(base)
    return {k: (base if k in base else DEFAULT_SWEEP)[k] for k in _pick("--kinds", kinds, DEFAULT_SWEEP)}


def _choose_fit(asked: bool, sweep: list[str] | None, quick: bool) -> bool:
    """Whether to fit the default intensities to the model; they are the only ones it fits."""
    from shiftcost.errors import InputError

    if asked and (sweep or quick):
        raise InputError(f"--fit-intensities stretches the default sweep, not {'--sweep' if sweep else '--quick'}'s; drop one of them.")
    return asked


def _choose_features(features: str | None) -> list[str]:
    from shiftcost.calibrate import COST_FEATURES
    from shiftcost.costmodel import KNOWN_FEATURES

    return list(COST_FEATURES) if features is None else _pick("--features", features, KNOWN_FEATURES)


def _load_inputs(
    model: Path | None, reference: Path | None, data: Path | None, demo: bool, seed: int, status: Console
) -> tuple[Any, Any, tuple[Any, Any], tuple[Any, Any]]:
    """The model, its spec, the labelled reference and new data: the user's files, or the digits demo."""
    from shiftcost.errors import InputError

    given = [name for name, value in (("--model", model), ("--reference", reference), ("--data", data)) if value is not None]
    if demo and given:
        raise InputError(f"--demo trains its own model and data; drop {', '.join(given)} or drop --demo.")
    if given and len(given) < 3:
        missing = [name for name in ("--model", "--reference", "--data") if name not in given]
        raise InputError(f"a sweep of your own model needs --model, --reference and --data; {', '.join(missing)} missing.")
    if not given:
        from shiftcost.data.demo import train_demo_model

        with status.status("training the digits demo CNN"):
            net, spec, splits = train_demo_model(seed=seed)
        return net, spec, splits["holdout"], splits["stream"]

    from shiftcost.data.batches import check_batch, load_batch
    from shiftcost.data.models import load_model

    net, spec = load_model(model)
    labelled = []
    for label, path in (("--reference", reference), ("--data", data)):
        batch = load_batch(path, spec=spec)
        check_batch(batch, spec)
        if batch.y is None:
            raise InputError(f"{label} {path} has no labels; the sweep retrains on it and needs a label per image.")
        labelled.append((batch.x, batch.y))
    return net, spec, labelled[0], labelled[1]


def _save_reference_stats(net: Any, spec: Any, reference: tuple[Any, Any], out: Path, device: str, seed: int) -> tuple[Any, Path]:
    """The reference statistics the sweep's indices use, written beside the cost model so
    that `shiftcost forecast --reference-stats` sees the same baseline."""
    from shiftcost.errors import InputError
    from shiftcost.index.engine import compute_reference_stats

    reference_stats = compute_reference_stats(net, spec, *reference, device=device, seed=seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output directory {out} ({error.strerror}); choose a writable path with --out.") from None
    return reference_stats, reference_stats.save(out / "reference.safetensors")


def _run_options(quick: bool, repeats: int | None, max_epochs: float | None) -> tuple[dict[str, Any], float | None]:
    """run_sweep's repeats and probe length, and the epoch cap (--quick's unless given)."""
    options: dict[str, Any] = {"repeats": 2, "probe_seconds": 3.0}
    if quick:
        options.update(QUICK_SETTINGS)
    if repeats is not None:
        options["repeats"] = repeats
    quick_cap = options.pop("max_epochs", None)
    return options, quick_cap if max_epochs is None else max_epochs


#: Exit status of `shiftcost calibrate` when a calibration (not --quick's smoke test) fitted no cost model.
EXIT_NO_COST_MODEL = 3


def _finish(result: SweepResult, reference_path: Path, as_json: bool, quick: bool) -> None:
    from shiftcost.errors import InputError

    result.files["reference_stats"] = str(reference_path)
    if len(result.failed) == len(result.rows):
        raise InputError(f"every point of the sweep failed (first: {result.rows[0]['error']}); see {result.files['report']}.")
    if as_json:
        typer.echo(json.dumps(_summary_json(result), indent=1, allow_nan=False))
    else:
        _print_tables(result, make_console())
    if result.cost_model_error and not quick:
        raise typer.Exit(EXIT_NO_COST_MODEL)


ModelFileOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model file (.safetensors or .pt) written by shiftcost.", show_default=False)
]
ReferenceOption = Annotated[
    Path | None,
    typer.Option("--reference", "-r", help="Labelled reference batch (ImageFolder, .npz or .pt): target and index baseline.", show_default=False),
]
DataOption = Annotated[
    Path | None, typer.Option("--data", "-d", help="Labelled new batch that every point corrupts and retrains on.", show_default=False)
]
DemoOption = Annotated[bool, typer.Option("--demo", help="Train the digits demo CNN and sweep the digits stream split (default without --model).")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Directory for the table, correlations, cost model, report and plot.")]
QuickOption = Annotated[bool, typer.Option("--quick", help="Smoke test: 2 kinds x 3 intensities, one short run per point (no real calibration).")]
SweepOption = Annotated[
    list[str] | None,
    typer.Option("--sweep", help="A corruption and its intensities, e.g. gaussian_noise=0,0.3,0.6 (repeatable; replaces the default sweep).", show_default=False),
]
RepeatsOption = Annotated[
    int | None, typer.Option("--repeats", min=1, help="Retraining runs per point, averaged (default 2; 1 with --quick).", show_default=False)
]
ToleranceOption = Annotated[
    float | None, typer.Option("--tolerance", min=0.0, max=0.99, help="Target = reference accuracy minus this (default 0.03).", show_default=False)
]
EvalEveryOption = Annotated[int | None, typer.Option("--eval-every", min=1, help="Optimizer steps between cutoff checks (default: a quarter epoch, at least 1, as in retrain and the pipeline).", show_default=False)]
HoldoutOption = Annotated[
    float | None,
    typer.Option("--holdout-fraction", min=0.05, max=0.9, help="Share of the new data held out to judge the cutoff (default 0.3).", show_default=False),
]
KindsOption = Annotated[
    str | None, typer.Option("--kinds", help="Comma-separated corruption kinds to sweep (default: all built-in kinds).", show_default=False)
]
FitIntensitiesOption = Annotated[
    bool,
    typer.Option(
        "--fit-intensities",
        help="Stretch each kind's default intensities until the model loses as much accuracy at the strongest as the demo CNN does "
        "(forward passes only, within --time-budget), for a model the default ones barely move or crush.",
    ),
]
LevelOption = Annotated[float, typer.Option("--level", min=0.5, max=0.99, help="Coverage of the cost model's intervals.")]
FeaturesOption = Annotated[
    str | None,
    typer.Option(
        "--features",
        help="Comma-separated cost-model features (default: resque_dist,inv_ari,layer_shift,accuracy,mean_loss,mean_entropy).",
        show_default=False,
    ),
]
ProbeStepsOption = Annotated[
    int, typer.Option("--probe-steps", min=0, help="Learning-probe steps per point for the forecast's probe stage (0: index stage only).")
]
#: Seconds the default sweep may take: with loading before it and the fit and writing after
#: it, the whole command stays within 10 minutes on a 2-core CPU whatever the model.
DEFAULT_TIME_BUDGET_S = 540.0
TimeBudgetOption = Annotated[
    float,
    typer.Option(
        "--time-budget", min=0.0,
        help="Seconds the sweep may take: kinds are swept round-robin and the sweep stops before a point likely to end past it (0: no limit).",
    ),
]
MaxEpochsOption = Annotated[
    float | None, typer.Option("--max-epochs", min=0.01, help="Epoch cap per run (default 15; 3 with --quick).", show_default=False)
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the demo model, the corruptions and the first repeat.")]
ThreadsOption = threads_option(
    "Torch CPU threads during the sweep (default: torch's, as retrain and the pipeline use). "
    "The host energy rate it fits holds at this many: give what the retrains will use."
)
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]
CountryOption = Annotated[str, typer.Option("--country", help="3-letter ISO code of the grid (carbon intensity).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")]


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        model: ModelFileOption = None,
        reference: ReferenceOption = None,
        data: DataOption = None,
        demo: DemoOption = False,
        out: OutOption = DEFAULT_OUT,
        quick: QuickOption = False,
        sweep: SweepOption = None,
        repeats: RepeatsOption = None,
        tolerance: ToleranceOption = None,
        eval_every: EvalEveryOption = None,
        holdout_fraction: HoldoutOption = None,
        kinds: KindsOption = None,
        fit_intensities: FitIntensitiesOption = False,
        level: LevelOption = 0.90,
        features: FeaturesOption = None,
        probe_steps: ProbeStepsOption = 16,
        time_budget: TimeBudgetOption = DEFAULT_TIME_BUDGET_S,
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
        threads: ThreadsOption = None,
        device: DeviceOption = "auto",
        country: CountryOption = "USA",
        as_json: JsonOption = False,
    ) -> None:
        """Corrupt new data with known shifts at known strengths, retrain to the cutoff for real, and measure how well the indices predict the cost.

        For each corruption kind and intensity: the indices in one pass, then retraining until held-out accuracy is back at the reference accuracy minus --tolerance (CodeCarbon measures the energy). Prints Pearson/Spearman correlations of each index with steps, epochs, energy, emissions, gradient norm and parameter change, the leave-one-corruption-out error of the cost model, and both forecast stages' on the batches that needed training beside the naive forecast, the other kinds' median epochs (the probe stage as forecast makes it, with a warning when it does no better than the index stage, or neither stage better than the naive forecast); writes points.json/.csv, correlations.json, report.md, loco.json, costmodel.json (index stage), forecaster.json (index and probe stages, for shiftcost forecast and the retrain budget guard), reference.safetensors (the reference statistics used) and a PNG plot to --out. Progress goes to stderr, one line per point when it is not a terminal.

        Exit status: 0 when the cost model was written (or --quick ran), 3 when the sweep ran but fitted no cost model (its points and report are written; the output says why and what to change), 2 on bad input.
        """
        from shiftcost.calibrate import SWEEP_CONFIG, run_sweep, torch_threads

        plan, chosen_features = _choose_plan(sweep, quick, kinds), _choose_features(features)
        fit = _choose_fit(fit_intensities, sweep, quick)
        err = make_console(stderr=True)
        with torch_threads(threads):
            net, spec, ref, new = _load_inputs(model, reference, data, demo, seed, err)
            reference_stats, reference_path = _save_reference_stats(net, spec, ref, out, device, seed)
        options, max_epochs = _run_options(quick, repeats, max_epochs)
        # The model's own recipe, as its retrains in the pipeline will use it.
        config = retrain_config(
            SWEEP_CONFIG, spec, recipe,
            max_epochs=max_epochs, tolerance=tolerance, eval_every=eval_every, holdout_fraction=holdout_fraction,
            optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule, batch_size=batch_size,
            augment=augment, replay_fraction=replay_fraction, freeze_batchnorm=freeze_batchnorm, train_step=train_step,
            device=device, country_iso_code=country,
        )
        with _SweepProgress(err) as progress:
            result = run_sweep(
                net, spec, *ref, *new, sweep=plan, level=level, features=chosen_features, probe_steps=probe_steps,
                time_budget_s=time_budget or None, reference_stats=reference_stats, seed=seed, config=config, threads=threads,
                progress=progress, out_dir=out, fit_intensities=fit, **options,
            )
        _finish(result, reference_path, as_json, quick)
