"""``shiftcost model``: bring your own model under management, without writing Python.

``model import`` turns a plain state dict (torchvision architecture by name, or your own
module through ``--factory pkg.module:build``) into a shiftcost model file that carries its
input size, channels, resize rule, normalisation and retraining recipe, and checks its
accuracy on labelled data. ``model register`` puts it into the database as a version with
its reference stats and calibrated cost model. ``model list``, ``model show`` and
``model approve`` look after the versions retraining adds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from shiftcost.cli._console import command_group, make_console
from shiftcost.cli.db import DatabaseUrlOption
from shiftcost.redaction import redact_url

model_app = command_group(
    name="model",
    help="Import, register, list, show and approve model versions.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
NameOption = Annotated[str | None, typer.Option("--name", help="Model name (default: the model_name setting).", show_default=False)]
COST_MODEL_HELP = "costmodel.json (or its directory) written by `shiftcost calibrate` on this model file."
JoulesOption = Annotated[
    float | None, typer.Option("--joules-per-sample-epoch", min=0.0, help="Energy unit of one training sample-epoch (default: the sweep's).", show_default=False)
]


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    from shiftcost.errors import InputError

    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise InputError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. {flag} 0.485,0.456,0.406.") from None


def _classes(classes: str | None, data: Path | None) -> tuple[str, ...]:
    """Class names from --classes (names, or a count), else the sub-folders of --data, or the
    ``classes`` array of a tensor file given as --data."""
    from shiftcost.data.batches import declared_classes
    from shiftcost.errors import InputError

    if classes is not None:
        names = tuple(part.strip() for part in classes.split(",") if part.strip())
        if len(names) == 1 and names[0].isdigit():
            return tuple(str(i) for i in range(int(names[0])))
        if len(names) < 2:
            raise InputError(f"--classes {classes!r} names fewer than 2 classes; list them in the model's output order, comma-separated.")
        return names
    if data is not None:
        # An ImageFolder's sorted folder names are the order a torchvision-trained model learnt.
        names = declared_classes(data) or ()
        if len(names) >= 2:
            return names
    raise InputError(
        "give --classes (names in the model's output order, or their count), or --data as an ImageFolder "
        "(one sub-folder per class) or an .npz/.pt file with a classes array."
    )


def _settings(database_url: str | None) -> Any:
    from shiftcost.config import load_settings

    return load_settings(database_url=database_url) if database_url else load_settings()


def _print(data: dict[str, Any], as_json: bool, title: str) -> None:
    from rich.table import Table

    if as_json:
        from shiftcost.pipeline.common import json_safe

        typer.echo(json.dumps(json_safe(data), indent=2))
        return
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    make_console().print(table)


def _accuracy_line(check: Any) -> str:
    return f"accuracy {check.accuracy:.4f} on {check.samples} images of {check.source} (chance {check.chance:.2f})"


@model_app.command("import")
def import_command(
    weights: Annotated[Path, typer.Argument(help="State dict: .pt/.pth (torch.save of model.state_dict()) or .safetensors.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (.safetensors or .pt).", show_default=False)],
    arch: Annotated[str | None, typer.Option("--arch", help="torchvision architecture name (resnet18, mobilenet_v3_small, ...).", show_default=False)] = None,
    factory: Annotated[
        str | None,
        typer.Option("--factory", help="Your own module: pkg.module:build, called with num_classes= when it takes it, returning an nn.Module.", show_default=False),
    ] = None,
    classes: Annotated[
        str | None, typer.Option("--classes", help="Class names in output order, comma-separated, or their count (default: the sub-folders of --data, or the classes array of an .npz/.pt given as --data).", show_default=False)
    ] = None,
    image_size: Annotated[int, typer.Option("--image-size", min=1, help="Square input size the model was trained on.")] = 224,
    channels: Annotated[int, typer.Option("--channels", min=1, help="Input channels (1 grey, 3 RGB).")] = 3,
    mean: Annotated[str | None, typer.Option("--mean", help="Normalisation mean per channel, e.g. 0.485,0.456,0.406.", show_default=False)] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalisation std per channel, e.g. 0.229,0.224,0.225.", show_default=False)] = None,
    resize: Annotated[str, typer.Option("--resize", help="stretch (both sides to --image-size) or shorter_side_crop (shorter side, then centre crop).")] = "stretch",
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="TOML file whose [recipe] table becomes the model's retraining recipe.", show_default=False)
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Labelled images (ImageFolder, .npz, .pt) to check the accuracy on.", show_default=False)
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Turn a plain state dict into a shiftcost model file, with its preprocessing and recipe.

    Only tensors are read (no unpickling of Python objects). With --data the accuracy is checked first: near chance refuses the import (nothing written); where ImageNet's mean/std, [-1, 1] or the images' own per-channel mean/std would do much better, one sentence says so and names the flags.
    """
    from shiftcost.data import check_batch, load_batch, save_model
    from shiftcost.data.importing import check_accuracy, check_weights_file, import_model, refuse_near_chance
    from shiftcost.recipe import RetrainConfig

    check_weights_file(weights)  # a wrong path is the first thing to say, before missing options
    recipe_table = None
    if recipe is not None:
        recipe_table = RetrainConfig.from_toml(recipe).to_dict()["recipe"]
    net, spec = import_model(
        weights, classes=_classes(classes, data), image_size=image_size, architecture=arch, factory=factory,
        in_channels=channels, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), resize=resize, recipe=recipe_table,
        classes_from="--classes" if classes is not None else f"the sub-folders of {data}" if data and data.is_dir() else f"the classes array of {data}",
    )  # fmt: skip
    result: dict[str, Any] = {"out": str(out), "spec": spec.to_dict()}
    check = None
    if data is not None:
        batch = load_batch(data, spec=spec)
        check_batch(batch, spec)
        check = check_accuracy(net, spec, batch)
        refuse_near_chance(check)
        result["accuracy"] = check.to_dict()
    saved = save_model(net, spec, out)
    result["out"] = str(saved)
    if as_json:
        _print(result, True, "")
    else:
        make_console().print(f"imported {spec.architecture} ({spec.num_classes} classes, {spec.in_channels}x{spec.image_size}x{spec.image_size}) to {saved}")
        if check is not None:
            make_console().print(_accuracy_line(check))
    if check is not None and check.suggestion:
        make_console(stderr=True).print(check.suggestion, highlight=False, soft_wrap=True)


@model_app.command("register")
def register_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file written by `shiftcost model import` (or by shiftcost).", show_default=False)],
    reference: Annotated[
        Path, typer.Option("--reference", "-r", help="Labelled reference data the model serves well (ImageFolder, .npz, .pt).", show_default=False)
    ],
    cost_model: Annotated[Path | None, typer.Option("--cost-model", help=COST_MODEL_HELP, show_default=False)] = None,
    joules: JoulesOption = None,
    name: NameOption = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Put a model file into the database as the model's next version, with its reference stats and cost model.

    The first version of a name becomes current; a later one is registered with the current version as its parent and becomes current. The accuracy on the reference data is checked first (near chance: refused, nothing written), and a cost model calibrated with another recipe than the model's is refused.
    """
    from shiftcost.pipeline.bootstrap import register_from_files

    settings = _settings(database_url)
    done = register_from_files(
        settings, str(model), str(reference), name=name, cost_model_path=None if cost_model is None else str(cost_model), joules_per_sample_epoch=joules
    )
    data = {
        "name": done.model.name,
        "version": done.model.version,
        "parent_version": done.parent_version,
        "reference_accuracy": done.model.reference_accuracy,
        "reference_samples": done.model.reference_samples,
        "cost_model_version": done.cost_model_version,
        "joules_per_sample_epoch": done.joules_per_sample_epoch,
        "weights_uri": redact_url(done.model.weights_uri),
        "budget": done.budget,
    }
    _print(data, as_json, f"registered {done.model.name} version {done.model.version}")
    suggestion = done.accuracy.get("suggestion")
    if suggestion:
        make_console(stderr=True).print(suggestion, highlight=False, soft_wrap=True)


@model_app.command("cost-model")
def cost_model_command(
    cost_model: Annotated[Path, typer.Argument(metavar="CALIBRATION", help=COST_MODEL_HELP, show_default=False)],
    joules: JoulesOption = None,
    name: NameOption = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give the model's current version a new calibration: the costmodel.json of a later `shiftcost calibrate` (new hardware, more points or kinds).

    The next assessment and retrain forecast with it, and retrains refit it from then on. A cost model calibrated on another architecture or with another recipe than the model's is refused (nothing written); earlier calibrations stay, so past decisions still name theirs.
    """
    from shiftcost.pipeline.bootstrap import attach_cost_model

    done = attach_cost_model(_settings(database_url), str(cost_model), name=name, joules_per_sample_epoch=joules)
    data = {
        "name": done.name,
        "version": done.version,
        "architecture": done.architecture,
        "calibration_version": done.calibration.calibration_version,
        "replaced_calibration_version": done.replaced_calibration_version,
        "cost_model_version": done.calibration.cost_model_version,
        "joules_per_sample_epoch": done.joules_per_sample_epoch,
    }
    _print(data, as_json, f"{done.name} version {done.version} forecasts with calibration {done.calibration.calibration_version}")


def check_reference_accuracy(net: Any, spec: Any, data: Path, *, allow_chance: bool = False) -> Any:
    """The accuracy check of `shiftcost reference`: near chance is refused (one sentence,
    as `model import` and `model register` do) unless ``allow_chance``, which turns the
    refusal into a warning; a better normalisation is named in ``check.suggestion``."""
    from shiftcost.data import load_batch
    from shiftcost.data.importing import check_accuracy, refuse_near_chance
    from shiftcost.errors import InputError

    batch = load_batch(data, spec=spec)
    if batch.y is None:
        return None
    check = check_accuracy(net, spec, batch)
    try:
        refuse_near_chance(check)
    except InputError as refusal:
        if not allow_chance:
            raise InputError(f"{str(refusal).rstrip('.')}; or pass --allow-chance to summarise it anyway.") from None
        check.suggestion = f"Warning: {refusal}"
    return check


def _version_row(row: Any, current_id: int | None, stats: Any) -> dict[str, Any]:
    details = dict(row.details or {})
    return {
        "name": row.name,
        "version": row.version,
        "status": row.status,
        "current": row.id == current_id,
        "architecture": row.architecture,
        "parent_id": row.parent_id,
        "reference_accuracy": None if stats is None else stats.accuracy,
        "created_at": row.created_at.isoformat(),
        "gate": details.get("gate"),
    }


def _versions(database_url: str | None, name: str | None) -> list[dict[str, Any]]:
    from shiftcost.cli.db import open_for_cli
    from shiftcost.store import repository
    from shiftcost.store.errors import NotFoundError

    db = open_for_cli(database_url)
    try:
        with db.session(readonly=True) as session:
            rows = repository.model_versions(session, name)
            current: dict[str, int | None] = {}
            for row in rows:
                if row.name not in current:
                    try:
                        current[row.name] = repository.get_model(session, row.name).id
                    except NotFoundError:
                        current[row.name] = None
            return [_version_row(row, current[row.name], repository.latest_reference_stats(session, row.id)) for row in rows]
    finally:
        db.dispose()


@model_app.command("list")
def list_command(name: NameOption = None, database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """List model versions: status (active, pending, rejected), which one is current, reference accuracy."""
    rows = _versions(database_url, name)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="model versions")
    for column in ("name", "version", "status", "current", "architecture", "reference accuracy", "created"):
        table.add_column(column)
    for row in rows:
        accuracy = row["reference_accuracy"]
        table.add_row(
            row["name"], str(row["version"]), row["status"], "yes" if row["current"] else "", row["architecture"],
            "-" if accuracy is None else f"{accuracy:.4f}", row["created_at"][:19],
        )  # fmt: skip
    make_console().print(table)


def _one_version(database_url: str | None, name: str | None, version: int | None) -> dict[str, Any]:
    from shiftcost.errors import InputError

    settings_name = name or _settings(database_url).model_name
    rows = [row for row in _versions(database_url, settings_name) if version is None and row["current"] or row["version"] == version]
    if not rows:
        which = f"version {version}" if version is not None else "a current version"
        raise InputError(f"Model {settings_name} has no {which}; see `shiftcost model list`.")
    return rows[0]


@model_app.command("show")
def show_command(
    version: Annotated[int | None, typer.Argument(help="Version number (default: the current one).", show_default=False)] = None,
    name: NameOption = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one model version: status, reference accuracy, and the promotion gate's figures for a retrained one."""
    row = _one_version(database_url, name, version)
    _print(row, as_json, f"{row['name']} version {row['version']}")


@model_app.command("approve")
def approve_command(
    version: Annotated[int, typer.Argument(help="The pending version to put in service.", show_default=False)],
    name: NameOption = None,
    force: Annotated[bool, typer.Option("--force", help="Also approve a version the promotion gate rejected.")] = False,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve a pending model version: it becomes active, and current when it is the newest active one."""
    from shiftcost.cli.db import open_for_cli
    from shiftcost.errors import InputError
    from shiftcost.store import repository
    from shiftcost.store.errors import NotFoundError

    model_name = name or _settings(database_url).model_name
    db = open_for_cli(database_url)
    try:
        with db.session() as session:
            try:
                row = repository.get_model(session, model_name, version)
            except NotFoundError as error:
                raise InputError(str(error)) from None
            if row.status == "active":
                raise InputError(f"Model {model_name} version {version} is active already; nothing to approve.")
            if row.status == "rejected" and not force:
                raise InputError(
                    f"Model {model_name} version {version} was rejected by the promotion gate (see `shiftcost model show {version}`); "
                    "add --force to put it in service anyway."
                )
            previous = row.status
            repository.set_model_status(session, row.id, "active")
    finally:
        db.dispose()
    _print({"name": model_name, "version": version, "was": previous, "status": "active"}, as_json, f"approved {model_name} version {version}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app)
