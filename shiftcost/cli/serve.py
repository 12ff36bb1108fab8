"""``shiftcost serve``: run the watch, assess and retrain deployments locally on a schedule.

A Prefect runner serves the three deployments of ``prefect.yaml`` from this process:
``watch`` every poll interval, ``assess`` and ``retrain`` when started. No Prefect server
is needed: without ``PREFECT_API_URL`` Prefect runs its ephemeral API on SQLite in
``PREFECT_HOME``. Prefect is imported inside the command (through ``flows``), so the rest
of the command line does not depend on it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shiftcost.redaction import redact_url

#: ``--grace-period`` of the commands that run flow runs as processes of their own, and its default.
GRACE_PERIOD_S = 30.0
GracePeriod = Annotated[
    float,
    typer.Option(
        "--grace-period", min=0.0,
        help="Seconds the flow runs in flight get to end after Ctrl-C or SIGTERM; those still running are then "
        "interrupted and get as long again to record it.",
    ),
]  # fmt: skip
#: Most flow runs at the same time, for the same commands.
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="Most flow runs at the same time.", show_default=False)]


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        interval: Annotated[
            float | None,
            typer.Option("--interval", min=1.0, help="Seconds between polls of the landing location (default: SHIFTCOST_POLL_INTERVAL_S).", show_default=False),
        ] = None,
        limit: Limit = None,
        grace_period: GracePeriod = GRACE_PERIOD_S,
    ) -> None:
        """Serve the watch (scheduled), assess and retrain deployments until interrupted (Ctrl-C or SIGTERM).

        Settings come from SHIFTCOST_* variables or the SHIFTCOST_CONFIG file, as for every command; set
        SHIFTCOST_FLOW_MODE=deployment to hand batches between the served deployments instead of running them
        as subflows. Runs are visible in the Prefect UI when PREFECT_API_URL points at a server; when it is set
        and no server answers there, the command stops with one sentence saying so (exit status 2).
        """
        import os

        from shiftcost.config import load_settings

        os.environ.setdefault("DO_NOT_TRACK", "1")
        settings = load_settings(**({"poll_interval_s": interval} if interval is not None else {}))
        from flows.deployments import serve as serve_deployments

        typer.echo(f"watching {redact_url(settings.landing)} every {settings.poll_interval_s:g} s for model {settings.model_name} (Ctrl-C stops)")
        serve_deployments(settings, limit=limit, grace_s=grace_period)
