"""``shiftcost worker``: run the flow runs of one Prefect work pool (production)."""

from __future__ import annotations

from typing import Annotated

import typer

from shiftcost.cli.serve import GRACE_PERIOD_S, GracePeriod, Limit


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        pool: Annotated[str, typer.Option("--pool", help="Work pool to take runs from (prefect.yaml: cpu for watch, gpu for assess and retrain).")],
        name: Annotated[str | None, typer.Option("--name", help="Worker name shown by Prefect (default: a random one).", show_default=False)] = None,
        limit: Limit = None,
        grace_period: GracePeriod = GRACE_PERIOD_S,
    ) -> None:
        """Run the flow runs of a work pool, as `prefect worker start --type process` does, until Ctrl-C or SIGTERM.

        Stopping it (Ctrl-C, SIGTERM, `docker stop`) lets the runs in flight end, or record that they were
        stopped and settle what they spent, instead of killing them at once. PREFECT_API_URL names the
        Prefect server; when it is unset or no server answers there, the command stops with one sentence
        saying so (exit status 2).
        """
        import os

        os.environ.setdefault("DO_NOT_TRACK", "1")
        from flows.worker import work

        work(pool, grace_s=grace_period, limit=limit, name=name)
