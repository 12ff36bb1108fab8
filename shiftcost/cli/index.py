"""``shiftcost index`` and ``shiftcost reference``: the retraining-cost indices of a batch.

``shiftcost reference`` summarises the reference data for a model once and writes the
stats file; ``shiftcost index`` runs one forward pass over a new batch and prints every
index against those stats (or against a reference batch, summarised on the fly).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import make_console

if TYPE_CHECKING:
    from rich.console import Console

REFERENCE_SUFFIX = ".safetensors"
# A progress bar for a pass this short would only flicker.
PROGRESS_DELAY_S = 1.0

ModelOption = Annotated[
    Path, typer.Option("--model", "-m", help="Model file (.safetensors or .pt) written by shiftcost.", show_default=False)
]
LayerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        "-l",
        help="Layer to hook, a named_modules() path; add ':input' for a module's input. Repeat for several; "
        "the first is the primary layer. Default: the input of the final classifier.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward call.")]
AutocastOption = Annotated[
    bool | None,
    typer.Option("--autocast/--no-autocast", help="bf16 autocast; default: on for CUDA, off for CPU.", show_default=False),
]


class _DelayedProgress:
    """A rich progress bar that appears only once a pass has run longer than ``delay`` seconds."""

    def __init__(self, console: Console, description: str, delay: float = PROGRESS_DELAY_S) -> None:
        self.console = console
        self.description = description
        self.delay = delay
        self.started = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._progress is None:
            if time.perf_counter() - self.started < self.delay:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> _DelayedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stderr_console() -> Console:
    return make_console(stderr=True)


def _load_model(path: Path) -> tuple[Any, Any]:
    from shiftcost.data.models import load_model

    return load_model(path)


def _load_checked_batch(path: Path, spec: Any, *, task: bool) -> Any:
    """Load a batch and run the model-level checks; in task mode labels may be new ids."""
    from shiftcost.data.batches import Batch, check_batch, load_batch

    batch = load_batch(path, spec=spec)
    check_batch(Batch(x=batch.x, y=None if task else batch.y, source=batch.source, classes=batch.classes), spec)
    return batch


@dataclass(frozen=True)
class _Pass:
    """How a forward pass over a batch runs, and where its progress shows."""

    batch_size: int
    device: str
    autocast: bool | None
    console: Console


def _reference_for(
    reference: Path, model: Any, spec: Any, layers: list[str] | None, run: _Pass, *, save_reference: Path | None
) -> Any:
    """Reference stats from a stats file, or computed from a reference batch."""
    from shiftcost.errors import InputError
    from shiftcost.index.reference import ReferenceStats

    if not reference.exists():
        raise InputError(
            f"Reference {reference} does not exist; give a stats file from `shiftcost reference` or a labelled reference batch."
        )
    if save_reference is not None and save_reference.suffix.lower() != REFERENCE_SUFFIX:
        raise InputError(f"Reference stats are written as safetensors; name the file {save_reference.with_suffix(REFERENCE_SUFFIX)}.")
    if reference.is_file() and reference.suffix.lower() == REFERENCE_SUFFIX:
        if save_reference is not None:
            raise InputError(
                f"--save-reference needs a reference batch, but {reference} is already a stats file; drop --save-reference."
            )
        return ReferenceStats.load(reference, model=model, layers=layers or None)
    return _compute_reference(reference, model, spec, layers, run, out=save_reference)


def _compute_reference(
    data: Path, model: Any, spec: Any, layers: list[str] | None, run: _Pass, *, out: Path | None,
    max_samples: int | None = None, seed: int = 0,
) -> Any:
    from shiftcost.errors import InputError
    from shiftcost.index.engine import compute_reference_stats
    from shiftcost.index.functional import DEFAULT_MAX_SAMPLES

    batch = _load_checked_batch(data, spec, task=False)
    if batch.y is None:
        raise InputError(f"Reference batch {data} has no labels; the reference data needs a label per image.")
    with _DelayedProgress(run.console, "reference") as progress:
        stats = compute_reference_stats(
            model,
            spec,
            batch.x,
            batch.y,
            layers=layers or None,
            batch_size=run.batch_size,
            device=run.device,
            autocast=run.autocast,
            max_samples=DEFAULT_MAX_SAMPLES if max_samples is None else max_samples,
            seed=seed,
            progress=progress,
        )
    if out is not None:
        stats.save(out)
    return stats


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _print_report(report: Any, console: Console) -> None:
    from rich.table import Table

    table = Table(title="Retraining-cost indices", show_header=True, header_style="bold")
    table.add_column("index")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        (f"RESQUE_dist ({report.resque_dist_variant})", report.resque_dist),
        ("inv_ARI", report.inv_ari),
        ("layer shift", report.layer_shift),
    ]
    if report.resque_task is not None:
        rows.append(("RESQUE_task", report.resque_task))
    if report.preindex_p is not None:
        rows.append(("PreIndex p", report.preindex_p))
    rows += [
        ("accuracy", report.accuracy),
        ("reference accuracy", report.reference_accuracy),
        ("mean loss", report.mean_loss),
        ("mean prediction entropy", report.mean_entropy),
        ("mean max-softmax confidence", report.mean_confidence),
        ("samples", report.samples),
        ("embedding sample", report.embedding_samples),
        ("seconds", report.seconds),
        ("device", report.device),
    ]
    for name, value in rows:
        table.add_row(name, _format(value))
    console.print(table)
    if len(report.layers) > 1:
        per_layer = Table(title="Per layer", header_style="bold")
        per_layer.add_column("layer")
        per_layer.add_column("RESQUE_dist", justify="right")
        per_layer.add_column("layer shift", justify="right")
        for layer in report.layers:
            per_layer.add_row(layer, _format(report.resque_dist_by_layer.get(layer)), _format(report.layer_shift_by_layer.get(layer)))
        console.print(per_layer)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def index_command(
    model: ModelOption,
    reference: Annotated[
        Path,
        typer.Option(
            "--reference",
            "-r",
            help="Reference stats file (.safetensors from `shiftcost reference`) or a labelled reference batch "
            "(ImageFolder directory, .npz or .pt), summarised on the fly.",
            show_default=False,
        ),
    ],
    batch: Annotated[
        Path, typer.Option("--batch", "-b", help="The new batch: ImageFolder directory, .npz or .pt.", show_default=False)
    ],
    layer: LayerOption = None,
    json_output: JsonOption = False,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 256,
    task: Annotated[
        bool, typer.Option("--task", help="The batch's labels belong to a new task: compute RESQUE_task on them.")
    ] = False,
    save_reference: Annotated[
        Path | None,
        typer.Option("--save-reference", help="When --reference is a batch, also write its stats to this file.", show_default=False),
    ] = None,
    autocast: AutocastOption = None,
) -> None:
    """Compute every retraining-cost index of a new batch in one forward pass."""
    from shiftcost.index.engine import assess

    console = _stderr_console()
    net, spec = _load_model(model)
    stats = _reference_for(reference, net, spec, layer, _Pass(batch_size, device, autocast, console), save_reference=save_reference)
    new = _load_checked_batch(batch, spec, task=task)
    with _DelayedProgress(console, "index") as progress:
        report = assess(
            net,
            spec,
            stats,
            new.x,
            new.y,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
            task=task,
            progress=progress,
            check_model=False,  # the stats were checked against this model when loaded or built
        )
    if json_output:
        _print_json(report.to_dict())
    else:
        _print_report(report, _stdout_console())


def _stdout_console() -> Console:
    return make_console()


def reference_command(
    model: ModelOption,
    data: Annotated[
        Path,
        typer.Option("--data", "-d", help="Labelled reference batch: ImageFolder directory, .npz or .pt.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the stats (.safetensors).", show_default=False)],
    layer: LayerOption = None,
    json_output: JsonOption = False,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 256,
    max_samples: Annotated[
        int, typer.Option("--max-samples", min=2, help="Size bound of the stored embedding sample.")
    ] = 20_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the embedding sample.")] = 0,
    autocast: AutocastOption = None,
    allow_chance: Annotated[
        bool,
        typer.Option(
            "--allow-chance",
            help="Summarise the data even when the model is no better than chance on it (an untrained model on purpose); otherwise refused.",
        ),
    ] = False,
) -> None:
    """Summarise a model's reference data once and write the stats file `shiftcost index` uses.

    The model's accuracy on the labelled data is checked first and printed: near chance is refused (nothing written) unless --allow-chance.
    """
    from shiftcost.errors import InputError

    if out.suffix.lower() != REFERENCE_SUFFIX:
        raise InputError(f"Reference stats are written as safetensors; name the output file {out.with_suffix(REFERENCE_SUFFIX)}.")
    console = _stderr_console()
    net, spec = _load_model(model)
    from shiftcost.cli.model import check_reference_accuracy

    check = check_reference_accuracy(net, spec, data, allow_chance=allow_chance)
    stats = _compute_reference(
        data, net, spec, layer, _Pass(batch_size, device, autocast, console), out=out, max_samples=max_samples, seed=seed
    )
    summary = {**stats.summary(), "out": str(out)}
    if check is not None and check.suggestion:
        summary["suggestion"] = check.suggestion
        console.print(check.suggestion, highlight=False, soft_wrap=True)
    if json_output:
        _print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"Reference stats written to {out}", header_style="bold")
    table.add_column("field")
    table.add_column("value")
    for key in ("architecture", "layers", "samples", "classes", "accuracy", "embedding_sample", "seconds", "fingerprint"):
        value = summary[key]
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else _format(value))
    _stdout_console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``index`` and ``reference`` to the ``shiftcost`` command line."""
    app.command("index")(index_command)
    app.command("reference")(reference_command)
