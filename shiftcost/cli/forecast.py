"""``shiftcost forecast``: what retraining on a batch will cost, without the database.

Stage 0 reads the shift indices of one pass over the batch; unless ``--no-probe``, stage 1
then fine-tunes a throw-away copy of the model for a few steps on a sample of the batch
and reads how fast it learns. The JSON names are stable (scripts depend on them):
``epochs``, ``energy_kwh``, ``co2_kg`` (each ``{median, low, high, level}``), ``stage``,
``probe``, ``features``, ``not_converging``, ``extrapolated`` (features beyond the calibrated
range, where the forecast is held at its edge).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from shiftcost.cli._console import make_console
from shiftcost.cli._threads import ThreadsOption, at_torch_threads
from shiftcost.features import COST_FEATURES


def forecast(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file (.safetensors or .pt) written by shiftcost.", show_default=False)],
    reference_stats: Annotated[
        Path, typer.Option("--reference-stats", "-r", help="Reference statistics of the model (shiftcost reference, or calibrate --model).", show_default=False)
    ],
    batch: Annotated[Path, typer.Option("--batch", "-b", help="Labelled new batch: ImageFolder directory, .npz or .pt.", show_default=False)],
    cost_model: Annotated[
        Path, typer.Option("--cost-model", "-c", help="forecaster.json written by shiftcost calibrate, the costmodel.json beside it (read with it; alone: the index stage, epochs only) or the directory holding them.", show_default=False)
    ],
    probe_steps: Annotated[
        int | None, typer.Option("--probe-steps", min=1, help="Probe fine-tuning steps (default: as calibrated).", show_default=False)
    ] = None,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Index forecast only (stage 0): no training at all.")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, max=0.99, help="Target = reference accuracy minus this.")] = 0.03,
    carbon_intensity: Annotated[
        float | None, typer.Option("--carbon-intensity", min=0.0, help="kg CO2e per kWh (default: CodeCarbon's figure for --country).", show_default=False)
    ] = None,
    country: Annotated[str, typer.Option("--country", help="3-letter ISO code of the grid (carbon intensity).")] = "USA",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probe's split and sample.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")] = "auto",
    threads: ThreadsOption = None,
    no_energy: Annotated[
        bool, typer.Option("--no-energy", help="Do not measure the probe with CodeCarbon; its energy is then estimated from the host's rate.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the forecast as JSON on stdout.")] = False,
) -> None:
    """Forecast the epochs, kWh and kg CO2e of retraining a model on a labelled batch, with intervals.

    The index forecast (stage 0) is free; the probe (stage 1) fine-tunes a copy of the model for a few steps on a small sample of the batch, and its own cost (steps, seconds, energy) is reported so it can be charged. Without --probe-steps there is no probe where calibration forecast its batches no better with one (it says so). --probe-steps and --no-probe are exclusive. The forecast is of a retrain like calibration's: where the model file's recipe differs from the calibrated one, stderr names each difference (the pipeline and retrain --cost-model refuse such a cost model). kWh are priced as the pipeline prices the retrain: each epoch trains the batch's training split and the reference samples that retrain replays (as many as the reference statistics summarise), the holdout is evaluated at the protocol's cadence, and no run goes past the retrains' epoch cap (15 by default, calibration's).
    """
    from shiftcost.data.batches import check_batch, load_batch
    from shiftcost.data.models import load_model
    from shiftcost.errors import ConfigError, InputError
    from shiftcost.forecast import protocol
    from shiftcost.forecast.forecaster import Forecaster, missing_energy_rate
    from shiftcost.index.reference import ReferenceStats
    from shiftcost.recipe import RetrainConfig

    if no_probe and probe_steps is not None:
        raise InputError("--probe-steps and --no-probe contradict each other; give one of them.")
    forecaster = Forecaster.load(cost_model)
    if forecaster.energy_rate is None:
        note = missing_energy_rate(cost_model, "the forecast gives epochs, with no kWh or kg CO2e")
    else:
        note = rate_mismatch_note(forecaster.energy_rate, device)
    if note:
        make_console(stderr=True).print(note, style="yellow")
    net, spec = load_model(model)
    forecaster.check_model(spec, str(model))
    reference = ReferenceStats.load(reference_stats, model=net)
    new = load_batch(batch, spec=spec)
    check_batch(new, spec)
    if new.y is None:
        raise InputError(f"batch {batch} has no labels; the forecast needs the model's accuracy on it. Label the batch.")
    protocol.check_above_chance(reference.accuracy, spec.num_classes, tolerance, f"the reference statistics {reference_stats}")
    features = _index_features(net, spec, reference, new, device)
    intensity = carbon_intensity if carbon_intensity is not None else _country_intensity(country)
    if probe_steps is not None and forecaster.stage1 is None:
        raise InputError(f"{cost_model} has no probe stage ({forecaster.stage1_error}); recalibrate with probe steps, or use --no-probe.")
    trajectory = None
    not_worth = forecaster.probe_not_worth() if probe_steps is None and forecaster.stage1 is not None else None
    if not_worth and not no_probe:
        make_console(stderr=True).print(f"no probe: {not_worth}; --probe-steps N probes anyway.", style="yellow")
    if not no_probe and forecaster.stage1 is not None and not not_worth:
        trajectory = run_calibrated_probe(forecaster, net, new, reference.accuracy, tolerance, probe_steps, seed, device, str(batch), not no_energy, country)
    retrain = RetrainConfig().for_model(spec)
    try:
        forecaster.check_retrain(retrain, "this model file's recipe", reference_available=True)
    except ConfigError as differ:
        # The pipeline refuses such a cost model; a retrain run by hand may take the calibrated settings as flags.
        make_console(stderr=True).print(f"This forecasts a retrain with the calibrated settings: {differ}", style="yellow")
    # Priced as the pipeline prices the retrain, the replayed reference samples included.
    replay = forecaster.retrain_settings.get("replay_fraction", retrain.recipe.replay_with(True))
    price = forecaster.retrain_price(len(new.y), replay_fraction=replay, reference_samples=reference.samples, cap_epochs=retrain.caps.max_epochs)
    result = forecaster.predict(features, probe=trajectory, price=price, carbon_intensity=intensity)
    if as_json:
        payload = _payload(result)
        payload.update(model=str(model), batch=str(batch), cost_model=str(cost_model))
        typer.echo(json.dumps(payload, indent=2, allow_nan=False))
        return
    _print_forecast(result, forecaster, trajectory)


def rate_mismatch_note(rate: Any, device: str) -> str | None:
    """Why a retrain's kWh on ``device`` may be off the rate's estimate (another kind of device, or on a
    CPU another thread count), and what to do about it."""
    import torch

    from shiftcost.index.capture import resolve_device

    kind, here = resolve_device(device).type, torch.get_num_threads()
    mismatch = None if rate is None else rate.mismatch(kind, here)
    if mismatch is None:
        return None
    what, why = mismatch
    if what == "device":
        remedy = f"calibrate with --device {kind}"
    else:
        remedy = f"give this command --threads {rate.threads}, or calibrate with --threads {here},"
    return f"{why[0].upper()}{why[1:]}: {remedy} to match."


def _index_features(net: Any, spec: Any, reference: Any, new: Any, device: str) -> dict[str, float]:
    """The cost features of one indexing pass over the batch (stage 0)."""
    from shiftcost.index.engine import assess

    report = assess(net, spec, reference, new.x, new.y, device=device)
    return {name: float(getattr(report, name)) for name in COST_FEATURES if getattr(report, name) is not None}


def _country_intensity(country: str) -> float:
    from shiftcost.pipeline.common import _grid_intensity

    return _grid_intensity(country.strip().upper())


def run_calibrated_probe(
    forecaster: Any, net: Any, new: Any, reference_accuracy: float, tolerance: float, probe_steps: int | None,
    seed: int, device: str, source: str, track_energy: bool, country: str,
) -> Any:
    """Stage 1: a few fine-tuning steps on a copy of the model, as calibration probed (as many steps unless given)."""
    from shiftcost.forecast.probe import run_probe

    options = forecaster.probe_options() | ({"steps": probe_steps} if probe_steps else {})
    return run_probe(
        net, new.x, new.y, target_accuracy=max(0.0, reference_accuracy - tolerance), ceiling=reference_accuracy,
        seed=seed, device=device, energy_rate=forecaster.energy_rate,
        source=source, retrain_batch_size=forecaster.batch_size, track_energy=track_energy, country_iso_code=country, **options,
    )


def _payload(result: Any) -> dict[str, Any]:
    """The forecast's JSON; ``probe`` always holds the probe's cost (zero without a probe)."""
    payload = result.to_dict()
    cost = payload["probe"] or {"steps": 0, "sample_gradients": 0, "samples_evaluated": 0, "seconds": 0.0, "energy_kwh": 0.0}
    payload["probe"] = {"steps": cost["steps"], "seconds": cost["seconds"], "energy": cost["energy_kwh"]} | cost
    return payload


def _print_forecast(result: Any, forecaster: Any, trajectory: Any) -> None:
    from rich.table import Table

    table = Table(title=f"forecast ({result.stage} stage, {result.epochs.level:.0%} intervals)", show_header=True)
    for name in ("measure", "median", "low", "high"):
        table.add_column(name)
    for name, interval in (("epochs", result.epochs), ("energy kWh", result.energy_kwh), ("kg CO2e", result.co2_kg)):
        if interval is not None:
            table.add_row(name, *(f"{v:.4g}" if v is not None else "unbounded" for v in (interval.median, interval.low, interval.high)))
    make_console().print(table)
    if result.extrapolated:
        make_console(stderr=True).print(
            f"{', '.join(result.extrapolated)} lies beyond anything calibration saw; the forecast is held at the edge of "
            "the calibrated range (at least that hard), not measured there.",
            style="yellow",
        )
    if result.not_converging:
        horizon = forecaster.horizon
        held = f" The whole interval is held at the forecast horizon: read it as {horizon:g} epochs or more." if result.epochs.low >= horizon else ""
        make_console(stderr=True).print(f"predicted not to converge within the {forecaster.max_epochs:g}-epoch cap.{held}", style="yellow")
    if trajectory is not None:
        c = trajectory.cost
        how = "measured" if c.energy_measured else "estimated" if c.energy_kwh is not None else "not known"
        energy = f", {c.energy_kwh:.3g} kWh ({how})" if c.energy_kwh is not None else ""
        make_console().print(
            f"probe: {c.steps} steps, {c.sample_gradients} sample-gradients, {c.samples_evaluated} held-out samples evaluated, {c.seconds:.2f} s{energy}"
        )
        if c.energy_error:
            make_console(stderr=True).print(
                f"CodeCarbon could not measure the probe ({c.energy_error}); its energy is the host rate's estimate.", style="yellow"
            )


def register(app: typer.Typer) -> None:
    app.command("forecast")(at_torch_threads(forecast))
