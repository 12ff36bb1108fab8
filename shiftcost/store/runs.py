"""Retrain runs: their heartbeat, closing the ones proven dead, and what a finished run recorded.

Every function runs in the caller's session; the caller commits.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shiftcost.jsonsafe import json_safe
from shiftcost.statuses import BatchStatus, LedgerKind, ModelStatus, RetrainStatus
from shiftcost.store import ledger, repository
from shiftcost.store.batches import guarded_update
from shiftcost.store.ledger import live_run_condition
from shiftcost.store.models import Batch, LedgerEntry, Model, RetrainRun, utcnow
from shiftcost.store.records import Claim, ClaimLost

__all__ = [
    "PRICED",
    "add_version",
    "close_dead_run",
    "closed_as_dead_at_a_price",
    "closing_entries",
    "dead_runs",
    "latest_run",
    "measured_run_details",
    "record_failure",
    "renew_heartbeat",
    "run_columns",
]


#: ``energy_method`` of a run killed outright: its energy is its last heartbeat's work priced at
#: the host's energy rate, not a measurement.
PRICED = "priced"


def renew_heartbeat(session: Session, run_id: int, now: datetime | None = None, progress: dict[str, Any] | None = None) -> bool:
    """Renew the heartbeat of a ``running`` run, with what it has done so far when ``progress``
    is given; False if the run is no longer running."""
    values: dict[str, Any] = {"heartbeat_at": now or utcnow()}
    if progress is not None:
        values["progress"] = json_safe(progress)
    result = session.execute(
        update(RetrainRun)
        .where(RetrainRun.id == run_id, RetrainRun.status == RetrainStatus.RUNNING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def dead_runs(
    session: Session, model_name: str | None, lease: timedelta, now: datetime, decision_ids: Collection[int] | None = None
) -> list[tuple[int, int | None, int | None, dict[str, Any] | None]]:
    """(run id, batch id, decision id, progress of its last heartbeat) of the runs of
    ``model_name`` (None: of every model; ``decision_ids``: of those decisions only) still
    ``running`` with no heartbeat (before the first one: no start) within ``lease`` of
    ``now``, oldest first."""
    query = (
        select(RetrainRun.id, RetrainRun.batch_id, RetrainRun.decision_id, RetrainRun.progress)
        .join(Model, Model.id == RetrainRun.model_id)
        .where(RetrainRun.status == RetrainStatus.RUNNING, ~live_run_condition(lease, now))
        .order_by(RetrainRun.id)
    )
    if model_name is not None:
        query = query.where(Model.name == model_name)
    if decision_ids is not None:
        query = query.where(RetrainRun.decision_id.in_(decision_ids))
    return [(run_id, batch_id, decision_id, progress) for run_id, batch_id, decision_id, progress in session.execute(query)]


def close_dead_run(
    session: Session, run_id: int, batch_id: int | None, lease: timedelta, now: datetime, message: str, progress: Any = None
) -> bool:
    """Mark a dead run and its ``retraining`` batch failed with ``message``; the run keeps the
    steps and epochs of ``progress`` (a ``pipeline.lease.Progress``: its last heartbeat's), if
    any, and its priced energy, with ``energy_method`` :data:`PRICED`.

    Guarded: False (nothing written) when the run is no longer running or proved alive
    meanwhile, so of racing watchers exactly one closes it.
    """
    done = {} if progress is None else {"steps": progress.steps, "epochs": progress.epochs}
    if progress is not None and progress.spent_kwh is not None:
        done |= {"energy_kwh": progress.spent_kwh, "emissions_kg": progress.spent_kg, "energy_method": PRICED}
    finished = session.execute(
        update(RetrainRun)
        .where(RetrainRun.id == run_id, RetrainRun.status == RetrainStatus.RUNNING, ~live_run_condition(lease, now))
        .values(status=RetrainStatus.FAILED, error=message, finished_at=utcnow(), **done)
        .execution_options(synchronize_session=False)
    )
    if finished.rowcount != 1:
        return False
    if batch_id is not None:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.RETRAINING)
            .values(status=BatchStatus.FAILED, failure_reason=f"Retraining failed: {message}.", updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return True


def closed_as_dead_at_a_price(session: Session, run_id: int) -> bool:
    """Whether the run was closed as dead and settled at its last heartbeat's priced work
    (:func:`close_dead_run`): a measure it records after all replaces that price."""
    run = session.get(RetrainRun, run_id)
    return run is not None and run.status == RetrainStatus.FAILED and run.energy_method == PRICED


def latest_run(session: Session, batch_id: int) -> RetrainRun | None:
    """The batch's newest retrain run, if it had one."""
    query = select(RetrainRun).where(RetrainRun.batch_id == batch_id).order_by(RetrainRun.id.desc()).limit(1)
    return session.scalars(query).first()


def closing_entries(session: Session, decision_id: int | None) -> tuple[list[int], list[int]]:
    """Ids of the decision's settle entries and of its release entries, oldest first."""
    query = (
        select(LedgerEntry.id, LedgerEntry.kind)
        .where(LedgerEntry.decision_id == decision_id, LedgerEntry.kind.in_((LedgerKind.SETTLE, LedgerKind.RELEASE)))
        .order_by(LedgerEntry.id)
    )
    entries = session.execute(query).all()
    return (
        [entry_id for entry_id, kind in entries if kind == LedgerKind.SETTLE],
        [entry_id for entry_id, kind in entries if kind == LedgerKind.RELEASE],
    )


def measured_run_details(session: Session, architecture: str, *, except_run: int) -> list[tuple[Any, Any]]:
    """The ``details`` of every other run of ``architecture`` that measured some energy, each
    beside the ``details`` of the model version it retrained (its spec: the input size)."""
    query = (
        select(RetrainRun.details, Model.details)
        .join(Model, Model.id == RetrainRun.model_id)
        .where(Model.architecture == architecture, RetrainRun.id != except_run, RetrainRun.energy_kwh > 0)
        # A dead run's energy was priced at the rate itself: fitting the rate to it would only echo the rate.
        .where(or_(RetrainRun.energy_method.is_(None), RetrainRun.energy_method != PRICED))
    )
    return [tuple(row) for row in session.execute(query).all()]


# ----------------------------------------------------------------------------- a finished run


def run_columns(result: Any) -> dict[str, Any]:
    """The ``retrain_runs`` columns a run's result fills (``shiftcost.retrain.RetrainResult``;
    its energy measure when it has one); empty for None."""
    if result is None:
        return {}
    columns: dict[str, Any] = {
        "samples": result.pool_samples,
        "steps": result.steps,
        "epochs": result.epochs,
        "reached_cutoff": result.reached_cutoff,
        "initial_accuracy": result.initial_accuracy,
        "target_accuracy": result.target_accuracy,
        "final_accuracy": result.final_accuracy,
        "grad_norms": result.grad_norms,
        "param_change": result.param_change,
        "param_change_per_layer": result.param_change_per_layer,
        "wall_seconds": result.wall_time_s,
        "details": result.to_dict(),
    }
    energy = result.energy
    if energy is not None:
        columns.update(
            energy_kwh=energy.energy_kwh,
            emissions_kg=energy.emissions_kg,
            cpu_energy_kwh=energy.cpu_energy_kwh,
            gpu_energy_kwh=energy.gpu_energy_kwh,
            ram_energy_kwh=energy.ram_energy_kwh,
            cpu_power_w=energy.cpu_power_w,
            gpu_power_w=energy.gpu_power_w,
            ram_power_w=energy.ram_power_w,
            cpu_model=energy.cpu_model[:300],
            gpu_model=(energy.gpu_model or "")[:300] or None,
            country_iso_code=energy.country_iso_code,
            country_name=energy.country_name,
            region=energy.region,
            carbon_intensity=energy.carbon_intensity_kg_per_kwh,
            energy_method="measured" if energy.fully_measured else "estimated",
        )
    return json_safe(columns)


def add_version(session: Session, model_name: str, spec: Any, parent_id: int, run_id: int, new_version: Any) -> Model:
    """Register the retrained version (``pipeline.retrain.NewVersion``) of ``model_name`` with
    its reference stats; its status is the promotion gate's (``active`` without a gate)."""
    gate = new_version.gate
    model = repository.register_model(
        session,
        model_name,
        spec.architecture,
        weights_uri=str(new_version.weights_path),
        layers=list(new_version.reference.layers),
        classes=list(spec.classes),
        parent_id=parent_id,
        fingerprint=new_version.fingerprint,
        details={
            "reference_data_uri": str(new_version.reference_data_path),
            "spec": spec.to_dict(),
            "retrain_run_id": run_id,
            "gate": None if gate is None else gate.to_dict(),
        },
        status=ModelStatus.ACTIVE if gate is None else gate.status,
    )
    reference = new_version.reference
    repository.add_reference_stats(
        session, model.id, str(new_version.reference_path), reference.fingerprint, reference.samples,
        accuracy=reference.accuracy, details=json_safe(reference.summary()),
    )  # fmt: skip
    return model


def record_failure(
    session: Session, claim: Claim, run_id: int, decision_id: int, columns: dict[str, Any], message: str
) -> tuple[list[int], list[int]]:
    """Mark the run and its claimed batch failed and close the decision's reservations.

    What the run measured (``columns``, see :func:`run_columns`) settles them, so the
    ledger's totals stay the sum of what the runs measured; without a measure they are
    released. A lost claim means another run recorded the batch's end: the run is still
    closed. Returns (settle entry ids, release entry ids).
    """
    reason = f"Retraining failed: {message}"
    try:
        guarded_update(session, claim, status=BatchStatus.FAILED, failure_reason=reason)
    except ClaimLost:
        pass
    priced = closed_as_dead_at_a_price(session, run_id)
    repository.finish_retrain_run(session, run_id, RetrainStatus.FAILED, **(columns | {"error": message}))
    if columns.get("energy_kwh") is None:
        return [], ledger.release_decision(session, decision_id, reason)
    note = f"spent by a run that then failed: {message}"
    kwh, co2 = columns["energy_kwh"], columns.get("emissions_kg") or 0.0
    return ledger.settle_decision(session, decision_id, kwh, co2, note=note, replaces_priced=priced), []
