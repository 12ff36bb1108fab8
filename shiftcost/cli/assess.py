"""``shiftcost assess PATH``: take one batch through the pipeline now.

The same steps the ``assess`` and ``retrain`` flows run (register once by fingerprint,
one forward pass, drift, cost, decision under the budgets, storage, and retraining when
decided), called directly, without Prefect. A batch registered before is not processed
again: its stored decision is shown.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import make_console
from shiftcost.cli.db import DatabaseUrlOption
from shiftcost.features import Feature

if TYPE_CHECKING:
    from shiftcost.pipeline import BatchResult

# Exit status when the batch itself was refused (unreadable, wrong shape, too small).
EXIT_BATCH_FAILED = 2
# Exit status when retraining was decided but failed (recorded, what it measured charged).
EXIT_RETRAIN_FAILED = 1


def _number(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _epochs_text(prediction: dict[str, Any]) -> str:
    """Predicted epochs as read: a forecast held at the horizon throughout is at least that many, not exactly."""
    from shiftcost.forecast.probe import HORIZON_CAPS, horizon_epochs

    cap, low = prediction.get("max_epochs"), prediction.get("epochs_lower")
    if cap and low is not None and low >= horizon_epochs(cap):
        return f"{horizon_epochs(cap):g} or more (the forecast horizon, {HORIZON_CAPS:g} calibration caps)"
    return f"{_number(prediction['epochs'])}  [{_number(low)}, {_number(prediction['epochs_upper'])}]"


def _table(result: BatchResult) -> Any:
    from rich.table import Table

    from shiftcost.redaction import redact_url

    assessment = result.assessment
    assert assessment is not None
    retraining = result.retraining
    status = assessment.status if retraining is None else f"retraining {retraining.status}"
    table = Table(title=f"batch {assessment.batch_id}: {status}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = [("source", redact_url(assessment.source_uri))]
    if result.registration is not None and not result.registration.created:
        rows.append(("registered before", "yes: not processed again, stored state shown"))
    if assessment.failure_reason:
        rows.append(("failure", assessment.failure_reason))
    if assessment.drift is not None:
        rows.append(("drift", f"{'detected' if assessment.drift else 'not detected'}  (report {assessment.drift_report})"))
    indices = assessment.indices or {}
    for name in (Feature.RESQUE_DIST, Feature.INV_ARI, Feature.LAYER_SHIFT, Feature.RESQUE_TASK, Feature.ACCURACY):
        if indices.get(name) is not None:
            rows.append((name, _number(indices[name])))
    prediction = assessment.prediction
    if prediction is not None:
        rows.append(("predicted epochs", _epochs_text(prediction)))
        rows.append(("predicted kWh", f"{_number(prediction['energy_kwh'])}  [{_number(prediction['energy_kwh_lower'])}, {_number(prediction['energy_kwh_upper'])}]"))
        rows.append(("predicted kg CO2e", f"{_number(prediction['emissions_kg'])}  [{_number(prediction['emissions_kg_lower'])}, {_number(prediction['emissions_kg_upper'])}]"))
        if assessment.forecast_stage is not None:
            rows.append(("forecast stage", f"{assessment.forecast_stage}: {assessment.probe_advice}" if assessment.probe_advice else assessment.forecast_stage))
        if assessment.probe_cost is not None:
            cost = assessment.probe_cost
            rows.append(("probe", f"{cost['steps']} steps, {cost['sample_gradients']} sample-gradients, {cost['seconds']:.2f} s, {_number(cost['energy_kwh'])} kWh"))
    if assessment.action is not None:
        rows.append(("decision", assessment.action))
        for reason in assessment.reasons:
            rows.append((f"  {reason['code']}", reason["message"]))
    if retraining is not None:
        rows.append(("retraining", f"{retraining.status}: {_number(retraining.epochs, '.2f')} epochs, {_number(retraining.energy_kwh)} kWh, {_number(retraining.emissions_kg)} kg CO2e"))
        if retraining.new_model_version is not None:
            rows.append(("new model version", str(retraining.new_model_version)))
        if retraining.error:
            rows.append(("retraining error", retraining.error))
    for name, value in rows:
        table.add_row(name, value)
    return table


def register(app: typer.Typer) -> None:
    @app.command("assess")
    def assess(
        path: Annotated[str, typer.Argument(help="The batch: an .npz/.pt file or ImageFolder folder, a local path or an fsspec URL.", show_default=False)],
        model: Annotated[str | None, typer.Option("--model", "-m", help="Registered model name (default: SHIFTCOST_MODEL_NAME).", show_default=False)] = None,
        retrain: Annotated[bool, typer.Option("--retrain/--no-retrain", help="Retrain now when the decision is retrain.")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
        database_url: DatabaseUrlOption = None,
    ) -> None:
        """Assess one batch: drift, indices, predicted cost and the decision under the budgets; retrain if decided.

        The model must have been registered first (`shiftcost model register`, or `shiftcost demo`). Exit status: 0 when
        the batch was processed (or had been before), 2 when the batch was refused (the reason is stored), 1 when a
        decided retraining failed (the run is marked failed and what it measured charged to its budget).
        """
        from pathlib import Path

        from shiftcost import landing, pipeline
        from shiftcost.config import load_settings

        overrides: dict[str, Any] = {}
        if model:
            overrides["model_name"] = model
        if database_url:
            overrides["database_url"] = database_url
        settings = load_settings(**overrides)
        if landing.is_local(path):
            local = Path(path.removeprefix("file://")).expanduser().resolve()
            if not local.exists():
                from shiftcost.errors import InputError

                raise InputError(f"Batch {path} does not exist; check the path.")
            uri = str(local)
        else:
            uri = path
        result = pipeline.process_batch(settings, uri, retrain=retrain)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), default=str))
        else:
            make_console().print(_table(result))
        if result.retraining is not None and result.retraining.status == "failed":
            raise typer.Exit(EXIT_RETRAIN_FAILED)
        if result.assessment is not None and result.assessment.status == "failed":
            raise typer.Exit(EXIT_BATCH_FAILED)
