"""``shiftcost labels attach BATCH FILE``: labels that come after their batch."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from shiftcost.cli._console import command_group
from shiftcost.cli.db import DatabaseUrlOption
from shiftcost.redaction import redact_url

labels_app = command_group(name="labels", help="Attach labels to a batch that arrived without them.", no_args_is_help=True)


@labels_app.command("attach")
def attach_command(
    batch: Annotated[str, typer.Argument(help="The batch: its id, or its source path as it was registered.", show_default=False)],
    labels_file: Annotated[
        str, typer.Argument(help="An .npz with y (one class id per image, in the batch's order) and optionally fingerprint.", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Attach labels to a batch (typically one awaiting_labels); the next poll or `shiftcost assess` decides afresh with them.

    The labels must count one per image and, when the file names a fingerprint, belong to this batch. A batch already retrained on cannot get new labels. Dropping NAME.labels.npz beside the batch NAME.npz in the landing location does the same at the next poll.
    """
    from shiftcost.cli.db import open_for_cli
    from shiftcost.pipeline.labels import attach_labels

    db = open_for_cli(database_url)
    try:
        attached = attach_labels(db, batch, labels_file)
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps(attached.to_dict(), indent=2))
    else:
        typer.echo(f"labels {redact_url(attached.labels_uri)} attached to batch {attached.batch_id} ({attached.samples} images); it will be assessed afresh.")


def register(app: typer.Typer) -> None:
    app.add_typer(labels_app)
