"""``shiftcost demo``: the whole loop on scikit-learn's bundled digits, in a few minutes.

1. train the base model (``shiftcost.data.demo``) and take the digits "holdout" split as
   its reference data;
2. calibrate the cost model with a small sweep of real retrains on a pool of stream images
   the scenario never uses (``shiftcost.calibrate.run_sweep``);
3. size a monthly kWh / kg CO2e budget from that calibration so a few retrains fit and
   later ones must wait, and bootstrap the pipeline (model version, reference stats, cost
   model, energy figure, budget);
4. drop the scenario's batches (``shiftcost.scenario``) into the landing folder one by one
   and run the real ``watch`` flow after each (Prefect's ephemeral API, SQLite);
5. print a table of every batch and write the HTML report (``shiftcost.report``).

Everything lives in the work folder (default ``./shiftcost-demo``): the database, the
landing folder, the artifacts, Prefect's home (``PREFECT_HOME``), the report. Nothing is
downloaded and ``DO_NOT_TRACK=1`` is set. A rerun in the same folder removes what the
previous run left there and starts clean; a non-empty folder that no demo made is refused.

Prefect and the flows are imported inside the command, after the environment is set, so
``import shiftcost.cli.demo`` stays light.
"""

from __future__ import annotations

import dataclasses

import json
import os
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import make_console
from shiftcost.errors import ConfigError, InputError, short_error
from shiftcost.cli._demo_output import fill_rows, print_summary, write_demo_report
from shiftcost.features import COST_FEATURES, Feature

if TYPE_CHECKING:
    from rich.console import Console

    from shiftcost.config import Settings

MODEL_NAME = "digits"
MARKER = ".shiftcost-demo"
#: What a demo run leaves in its work folder; a rerun removes exactly these.
OWNED = ("shiftcost.db", "shiftcost.db-wal", "shiftcost.db-shm", "landing", "artifacts", "prefect",
         "calibration", "report.html", "summary.json")

#: The demo's calibration: three kinds at a few strengths, one real retrain per point.
#: Frost and the other kinds are left out on purpose, so one scenario batch is a kind the
#: cost model never saw.
CALIBRATION_SWEEP: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.0, 0.06, 0.1, 0.14, 0.18),
    "contrast": (0.15, 0.25, 0.35, 0.45),
    "gaussian_blur": (0.75, 1.0, 1.25, 1.5),
}
#: ``--quick``: the smallest sweep that still fits a cost model (for tests and smoke runs).
QUICK_CALIBRATION_SWEEP: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.06, 0.1, 0.14, 0.18),
    "contrast": (0.15, 0.25, 0.35, 0.45),
}
#: Cost model features tried in order; the first the calibration can support is used.
FEATURE_SETS: tuple[tuple[str, ...], ...] = (
    COST_FEATURES,
    (Feature.RESQUE_DIST, Feature.ACCURACY, Feature.MEAN_LOSS),
    (Feature.RESQUE_DIST,),
)
#: Demo settings (environment variables, so the flows see them too).
DEMO_SETTINGS = {
    "SHIFTCOST_MODEL_NAME": MODEL_NAME,
    "SHIFTCOST_FLOW_MODE": "inline",
    "SHIFTCOST_DEVICE": "cpu",
    "SHIFTCOST_INTERVAL_LEVEL": "0.8",
    "SHIFTCOST_RETRAIN_MAX_EPOCHS": "20",
    "SHIFTCOST_RETRAIN_BATCH_SIZE": "64",
    "SHIFTCOST_RETRAIN_HOLDOUT_FRACTION": "0.25",
    "SHIFTCOST_CUTOFF_TOLERANCE": "0.03",
    "SHIFTCOST_ENERGY_SAMPLE_S": "0.5",
    "SHIFTCOST_COUNTRY_ISO_CODE": "USA",
    "SHIFTCOST_BUDGET_NAME": "demo-monthly",
    "SHIFTCOST_BUDGET_PERIOD": "monthly",
    # Drift needs two of the three test groups to agree, and three of the four image
    # statistics to move: after a retrain on noisy data the reference holds noisy images
    # too, and one group (or two statistics) alone then flags clean data.
    "SHIFTCOST_DRIFT_MIN_GROUPS": "2",
    "SHIFTCOST_DRIFT_IMAGE_STATS_SHARE": "0.75",
}
#: The monthly budget holds this many typical retrains (at the predicted upper bound).
BUDGET_RETRAINS = 2.0
SCENARIO_BATCH_SIZE = 250
#: Images the calibration sweep retrains on: half of the 540 stream images, so every
#: calibration retrain works on about as many images as a stream batch. Epochs to the
#: cutoff depend on the batch size and on the holdout's granularity (with 45 holdout images
#: "already met" is close to chance). Over model seeds 0-5, a 180-image pool put 6 of 11
#: stream retrains inside the 80% interval and could not fit seed 2 at all; 270 put 15 of 19.
CALIBRATION_IMAGES = 270


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@dataclass
class DemoRun:
    """What the demo did, for the table, the JSON output and the report's notes."""

    workdir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    report: str | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    cpu_children_s: float = 0.0

    @property
    def retrains(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("actual_kwh") is not None]

    def to_dict(self) -> dict[str, Any]:
        keys = ("step", "batch", "shift", "unseen", "status", "drift", "resque_dist", "inv_ari", "layer_shift",
                "accuracy", "predicted_kwh", "predicted_kwh_lower", "predicted_kwh_upper", "decision", "reason",
                "actual_kwh", "predicted_epochs", "actual_epochs", "run_status", "why", "note", "seconds")
        return {
            "workdir": str(self.workdir),
            "report": self.report,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "cpu_children_s": self.cpu_children_s,
            "stages_s": self.stages,
            "calibration": self.calibration,
            "budget": self.budget,
            "batches": [{key: row.get(key) for key in keys} for row in self.rows],
            "retrains": [
                {key: row.get(key) for key in ("batch", "shift", "predicted_kwh", "predicted_kwh_lower",
                                                "predicted_kwh_upper", "actual_kwh", "predicted_epochs",
                                                "actual_epochs", "run_status")}
                for row in self.retrains
            ],
        }


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Work folder: database, landing, artifacts, Prefect home, report.",
                                          file_okay=False)] = Path("shiftcost-demo"),
    batches: Annotated[int | None, typer.Option("--batches", min=1, help="Stream only the first N scenario batches (default: all 10).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller calibration sweep (for smoke tests; the budget is sized from it).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model, the calibration and the stream.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (progress goes to stderr).")] = False,
) -> None:
    """Run the whole loop on the bundled digits: train, calibrate, budget, stream shifted batches
    through the real flows, then print a table and write an HTML report."""
    console = make_console(stderr=as_json)
    run = run_demo(workdir, batches=batches, quick=quick, seed=seed, console=console)
    if as_json:
        typer.echo(json.dumps(run.to_dict(), default=str))
        return
    print_summary(console, run)


# ----------------------------------------------------------------------------- the run


def run_demo(workdir: Path, *, batches: int | None = None, quick: bool = False, seed: int = 0,
             console: Console | None = None) -> DemoRun:
    """Run the demo in ``workdir`` (see the module notes); returns what happened."""
    console = console or make_console()
    started_wall, started_cpu = time.perf_counter(), _cpu_seconds()
    workdir = prepare_workdir(workdir)
    demo_environment(workdir)
    import torch

    # The demo CNN gains nothing from intra-op threads, and on a busy machine they spin
    # against other processes: one thread keeps calibration and the flows' retrains alike.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(workdir, batches=batches, quick=quick, seed=seed, console=console,
                    started=(started_wall, started_cpu))
    finally:
        torch.set_num_threads(threads)


class _Stages:
    """The demo's progress bar, one line per stage in a log, and the seconds each stage took."""

    def __init__(self, progress: Any, console: Console, run: DemoRun, started_wall: float, total: int) -> None:
        self.progress, self.console, self.run, self.started_wall = progress, console, run, started_wall
        self.overall = progress.add_task("demo", total=total)

    def show(self, name: str) -> None:
        self.progress.update(self.overall, description=name)
        if not self.console.is_terminal:  # no live bar in a log: one line per stage instead
            self.console.print(f"[{time.perf_counter() - self.started_wall:5.0f} s] {name}", highlight=False)

    def advance(self) -> None:
        self.progress.advance(self.overall)

    @contextmanager
    def timed(self, key: str, name: str | None = None, *, advance: bool = True) -> Iterator[None]:
        """Time a stage as ``run.stages[key]``; show ``name`` first, advance the bar at its end."""
        clock = time.perf_counter()
        if name is not None:
            self.show(name)
        yield
        if advance:
            self.advance()
        self.run.stages[key] = time.perf_counter() - clock


def _run(workdir: Path, *, batches: int | None, quick: bool, seed: int, console: Console,
         started: tuple[float, float]) -> DemoRun:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from shiftcost.scenario import default_steps, demo_pools

    started_wall, started_cpu = started
    with prefect_start_errors():  # a bad Prefect setting is refused now, not after the calibration
        from flows.watch import watch
    run = DemoRun(workdir=workdir)
    sweep = QUICK_CALIBRATION_SWEEP if quick else CALIBRATION_SWEEP
    steps = default_steps(sweep)
    if batches is not None:
        steps = steps[:batches]
    points = sum(len(levels) for levels in sweep.values())
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        stages = _Stages(progress, console, run, started_wall, total=2 + points + len(steps) + 1)
        with stages.timed("train_model", "training the base model on digits"):
            model, spec, splits = _base_model(seed)
            calibration_pool, scenario_pool = demo_pools(seed, calibration_images=CALIBRATION_IMAGES)
        with stages.timed("calibrate", advance=False):
            settings = _settings()
            cost_model, joules, run.calibration = _calibrate_stage(stages, model, spec, splits, calibration_pool, settings, sweep, seed)
        with stages.timed("bootstrap", "sizing the budget and bootstrapping the pipeline"):
            settings = _bootstrap_stage(run, settings, model, spec, splits, cost_model, joules)
        with stages.timed("stream", "starting Prefect's ephemeral API", advance=False):
            _stream(stages, run, watch, scenario_pool, steps, spec, settings, seed)
        with stages.timed("report", "writing the report"):
            fill_rows(run, settings)
            run.report = str(write_demo_report(run, settings))
        stages.show("done")

    run.wall_s = time.perf_counter() - started_wall
    run.cpu_s = _cpu_seconds() - started_cpu
    run.cpu_children_s = _children_cpu_seconds()
    (workdir / "summary.json").write_text(json.dumps(run.to_dict(), default=str, indent=1), encoding="utf-8")
    return run


def _base_model(seed: int) -> tuple[Any, Any, dict[str, Any]]:
    from shiftcost.data.demo import train_demo_model

    model, spec, splits = train_demo_model(seed)
    # The demo CNN is trained from scratch on small digits: its own recipe fine-tunes at 1e-3
    # with its batch-norm statistics updated (the default recipe is for converged models).
    spec = dataclasses.replace(spec, recipe={"lr": 1e-3, "freeze_batchnorm": False})
    return model, spec, splits


def _calibrate_stage(stages: _Stages, model: Any, spec: Any, splits: dict[str, Any], pool: tuple[Any, Any],
                     settings: Settings, sweep: dict[str, Any], seed: int) -> tuple[Any, float, dict[str, Any]]:
    def on_point(done: int, total: int, label: str) -> None:
        if done:
            stages.advance()
        stages.show(f"calibrating: {label} ({done}/{total})" if done else "calibrating the cost model")

    return calibrate(model, spec, splits["holdout"], pool, settings, sweep, seed=seed, progress=on_point)


def _bootstrap_stage(run: DemoRun, settings: Settings, model: Any, spec: Any, splits: dict[str, Any],
                     cost_model: Any, joules: float) -> Settings:
    """Size the budget from the calibration, then bootstrap the pipeline under it; the settings with the budget."""
    from shiftcost.pipeline import bootstrap

    run.budget = size_budget(cost_model, settings, joules)
    os.environ["SHIFTCOST_BUDGET_KWH"] = repr(run.budget["kwh_cap"])
    os.environ["SHIFTCOST_BUDGET_CO2"] = repr(run.budget["co2_cap"])
    settings = _settings()
    bootstrap(settings, model, spec, *splits["holdout"], calibration=cost_model, joules_per_sample_epoch=joules,
              hardware=run.calibration["hardware"])
    return settings


def _stream(stages: _Stages, run: DemoRun, watch: Any, pool: Any, steps: list[Any], spec: Any, settings: Settings,
            seed: int) -> None:
    """Drop each scenario batch into the landing folder and run the real watch flow on it."""
    from shiftcost.scenario import build_scenario

    scenario = build_scenario(pool, steps, batch_size=SCENARIO_BATCH_SIZE, seed=seed, classes=spec.classes)
    landing = Path(settings.landing)
    for item in scenario:
        stages.show(f"batch {item.position}/{len(scenario)}: {item.step.label}")
        path = item.write(landing)
        batch_clock = time.perf_counter()
        with prefect_start_errors():  # the first flow call starts the API
            state = watch(return_state=True)
        problem = None if state.is_completed() else f"watch flow {state.type.value.lower()}: {state.message}"
        run.rows.append({"flow_error": problem, "step": item.position, "file": path, "shift": item.step.label, "unseen": item.step.unseen,
                         "note": item.step.note, "kind": item.step.kind, "seconds": time.perf_counter() - batch_clock})
        stages.advance()


STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


@contextmanager
def prefect_start_errors() -> Iterator[None]:
    """Prefect's two ways to fail before a flow runs, as one sentence a user can act on.

    Prefect parses its settings from the environment when the flows are imported (a
    pydantic ``ValidationError``) and starts its ephemeral API on the first flow call (a
    plain ``RuntimeError`` when the API does not answer in time).
    """
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as error:
        raise ConfigError(
            f"Prefect refused a setting from the environment ({short_error(error, 160)}); "
            "correct or unset that PREFECT_ variable and run the demo again."
        ) from None
    except RuntimeError as error:
        if "ephemeral Prefect API" not in str(error):
            raise
        raise ConfigError(
            f"Prefect's ephemeral API did not answer within {STARTUP_TIMEOUT}={os.environ.get(STARTUP_TIMEOUT)} s "
            f"({short_error(error, 160)}); run the demo again when the machine is less busy, or raise that setting."
        ) from None


def prepare_workdir(workdir: Path) -> Path:
    """Create ``workdir`` or clean what an earlier demo left there; refuse anyone else's folder."""
    workdir = workdir.expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"The demo work folder {workdir} is a file; choose a folder with --workdir.")
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise InputError(
            f"The folder {workdir} is not empty and was not made by shiftcost demo; choose an empty or new folder with --workdir."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        target = workdir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (workdir / MARKER).write_text("made by shiftcost demo; a rerun cleans this folder\n", encoding="utf-8")
    return workdir


def demo_environment(workdir: Path) -> None:
    """Point shiftcost and Prefect at the work folder, before Prefect is imported.

    The demo always runs on Prefect's ephemeral API: a ``PREFECT_API_URL`` from the
    caller's environment is dropped for this process.
    """
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(
        {
            "DO_NOT_TRACK": "1",
            "PREFECT_HOME": str(workdir / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOGGING_TO_API_ENABLED": "false",
            "SHIFTCOST_DATABASE_URL": f"sqlite:///{workdir / 'shiftcost.db'}",
            "SHIFTCOST_LANDING": str(workdir / "landing"),
            # The report reads each scenario file back where it landed, so nothing is archived.
            "SHIFTCOST_LANDING_ARCHIVE": "",
            "SHIFTCOST_ARTIFACTS_DIR": str(workdir / "artifacts"),
            **DEMO_SETTINGS,
        }
    )
    for name in ("SHIFTCOST_BUDGET_KWH", "SHIFTCOST_BUDGET_CO2", "SHIFTCOST_BUDGET_ROLLING_DAYS"):
        os.environ.pop(name, None)
    # The ephemeral API's event services write to the same SQLite file as its flow-run API;
    # on a fresh Prefect home the task-run recorder held it locked and a batch waited out
    # SQLite's busy timeout (a first demo took 130 s where a second took 78). Nothing in the
    # demo reads Prefect's task runs or events: its record is the shiftcost database.
    for service in ("TASK_RUN_RECORDER", "EVENT_PERSISTER", "TRIGGERS"):
        os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")


def _settings() -> Settings:
    from shiftcost.config import load_settings

    return load_settings()


def calibrate(model: Any, spec: Any, reference: tuple[Any, Any], pool: tuple[Any, Any], settings: Settings,
              sweep: dict[str, tuple[float, ...]], *, seed: int = 0, progress: Any = None) -> tuple[Any, float, dict[str, Any]]:
    """A small calibration sweep with the pipeline's own retraining settings; the fitted cost model.

    Returns ``(cost_model, joules_per_sample_epoch, summary)``. The joules figure is the
    sweep's measured energy over its sample-epochs (evaluations included), which is what a
    retrain in the pipeline measures too.
    """
    from shiftcost.calibrate import analyse, run_sweep
    from shiftcost.recipe import RetrainConfig

    # The pipeline's retraining settings, checked every step as the sweep does.
    config = RetrainConfig.from_settings(settings).for_model(spec).replace(eval_every=1)
    result = run_sweep(
        model, spec, *reference, *pool, sweep=sweep, seed=seed, repeats=1, config=config,
        probe=False, level=settings.interval_level, features=FEATURE_SETS[0], progress=progress,
    )
    cost_model, features, errors = result.cost_model, FEATURE_SETS[0], [result.cost_model_error]
    for fallback in FEATURE_SETS[1:]:
        if cost_model is not None:
            break
        features = fallback
        retry = analyse(result.rows, level=settings.interval_level, features=fallback)
        cost_model = retry.cost_model
        errors.append(retry.cost_model_error)
    if cost_model is None:
        raise InputError(f"The demo's calibration sweep could not fit a cost model ({errors[-1]}); rerun with a different --seed.")
    joules = result.joules_per_sample_epoch.get("sweep")
    if not joules:
        raise InputError("The demo's calibration sweep measured no energy, so kWh cannot be predicted; check that CodeCarbon runs here.")
    statuses: dict[str, int] = {}
    for row in result.rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    summary = {
        "points": len(result.rows),
        "kinds": sorted(sweep),
        "statuses": statuses,
        "features": list(features),
        "joules_per_sample_epoch": joules,
        "wall_s": result.timing.get("wall_s"),
        "cpu_s": result.timing.get("cpu_s"),
        "loo_mdape_epochs": (cost_model.history_.latest.loo or {}).get("mdape_epochs"),
        "interval_level": settings.interval_level,
        "hardware": "digits_cnn on this machine's CPU, from the calibration sweep's CodeCarbon readings",
    }
    return cost_model, float(joules), summary


def size_budget(cost_model: Any, settings: Settings, joules: float) -> dict[str, Any]:
    """A monthly cap of ``BUDGET_RETRAINS`` typical retrains of a scenario batch, at the predicted upper bound.

    "Typical" is the median upper bound the cost model gives the calibration points that
    needed training, for a batch of the scenario's size; CO2e follows from the carbon
    intensity. Since the policy checks upper bounds and the ledger settles measured
    costs, this lets a few retrains through and makes later ones wait.
    """
    import math
    import statistics

    from shiftcost.pipeline import carbon_intensity
    from shiftcost.pipeline.common import training_samples

    samples = training_samples(SCENARIO_BATCH_SIZE, settings.retrain_holdout_fraction)
    intensity = carbon_intensity(settings)
    latest = cost_model.history_.latest
    shifted = [{name: row["x"][name] for name in latest.features} for row in latest.rows if row["epochs"] > 0]
    uppers = [
        prediction.energy_kwh_upper
        for prediction in cost_model.predict_costs(shifted, samples=samples, joules_per_sample_epoch=joules, carbon_intensity=intensity)
        if prediction.energy_kwh_upper is not None and math.isfinite(prediction.energy_kwh_upper)
    ]
    if not uppers:
        raise InputError("The demo's cost model gives no finite upper bound for its calibration points, so no budget can be sized; rerun with a different --seed.")
    typical = statistics.median(uppers)
    kwh_cap = BUDGET_RETRAINS * typical
    return {"name": settings.budget_name, "period": "monthly", "kwh_cap": kwh_cap, "co2_cap": kwh_cap * intensity,
            "typical_upper_kwh": typical, "retrains": BUDGET_RETRAINS, "carbon_intensity": intensity}


def _children_cpu_seconds() -> float:
    """CPU time of child processes: finished ones, plus those still running (Prefect's
    ephemeral API server lives until this process exits)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    try:
        import psutil  # installed with CodeCarbon; only a better figure, not a requirement
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
