"""Recording how a retrain ended, in one transaction each, and reading it back.

:func:`record_retrain_success` stores the finished run, settles the ledger with the
measured cost, registers the new model version and its reference stats, the refitted cost
model and the host's energy rate (:func:`refit_energy_rate`), and marks the batch done.
:func:`record_retrain_failure` marks the run and the batch failed and settles what the
run measured (or releases the reservation when nothing was). :func:`fail_stale_retrains`
closes the runs proven dead. The rows are written by ``shiftcost.store.runs``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from shiftcost.energy import device_kind
from shiftcost.pipeline.claims import ClaimLost, guarded_update
from shiftcost.pipeline.common import json_safe, refitted_forecaster, store_cost_model
from shiftcost.statuses import BatchStatus, ModelStatus, RetrainStatus

if TYPE_CHECKING:
    from collections.abc import Collection
    from datetime import datetime

    from shiftcost.costmodel import CostModel
    from shiftcost.pipeline.retrain import Gate, NewVersion, RetrainInputs, RetrainJob
    from shiftcost.retrain import RetrainResult
    from shiftcost.store import Database

__all__ = [
    "RetrainOutcome",
    "fail_stale_retrains",
    "not_started",
    "record_retrain_failure",
    "record_retrain_success",
    "refit_energy_rate",
    "retrain_outcome_of",
]


@dataclass
class RetrainOutcome:
    """What retraining a batch did: the run, its measured cost, the new versions."""

    batch_id: int
    status: str
    """``succeeded``, ``cap_reached``, ``stopped_by_budget`` or ``failed``; ``not_started`` when the batch was not
    waiting for retraining (already retrained, or its decision was not retrain)."""
    run_id: int | None = None
    decision_id: int | None = None
    epochs: float | None = None
    steps: int | None = None
    reached_cutoff: bool | None = None
    energy_kwh: float | None = None
    emissions_kg: float | None = None
    new_model_id: int | None = None
    new_model_version: int | None = None
    new_model_status: str | None = None
    """``active``, ``pending`` or ``rejected`` (the promotion gate's verdict)."""
    calibration_id: int | None = None
    cost_model_version: int | None = None
    settled: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))



def _run_measures(result: RetrainResult | None) -> dict[str, Any]:
    from shiftcost.store import runs

    return runs.run_columns(result)


def refit_energy_rate(session: Any, inputs: RetrainInputs, result: RetrainResult) -> dict[str, Any] | None:
    """Refit the energy rate of the architecture at this input size from every finished run of
    it that measured energy like this one (:func:`runs_alike`).

    The rate (joules per training sample, evaluations weighted by ``EVAL_SAMPLE_WEIGHT``, and
    per run) is a robust line through the runs (``HostEnergyRate.fit``): one run on a loaded
    machine does not move it far. It is stored as the newest energy probe of the architecture
    at that size, which the next assessment and the next guard price with. Returns the run's
    measured kWh beside what the rate in force before it estimated, and the rates; None when
    the run measured no energy.
    """
    from shiftcost.energy import HostEnergyRate, run_work
    from shiftcost.pipeline.common import stored_energy_rate
    from shiftcost.store import repository, runs

    own = run_work(result.to_dict())
    if own[0] is None or own[0] <= 0:
        return None
    architecture = inputs.spec.architecture
    threads, kind = _trained_threads(result), device_kind(result.device)
    shape = inputs.spec.shape_key
    measured = runs.measured_run_details(session, architecture, except_run=inputs.job.run_id)
    earlier = [run for run, model in measured if _shape_key(model) == shape]
    works = [run_work(details) for details in runs_alike(earlier, kind, threads)] + [own]
    refitted = HostEnergyRate.fit(works, hardware=f"refitted from {len(works)} retrain runs", threads=threads, device=kind)
    before = repository.latest_energy_probe(session, architecture, image_size=shape)
    estimated = None
    if before is not None:
        estimated = stored_energy_rate(before).kwh(own[1], own[2])
    repository.add_energy_probe(
        session, architecture, refitted.hardware or "refitted", shape, refitted.joules_per_sample, measurement_method="refitted", energy_kwh=own[0],
        details=json_safe({"rate": refitted.to_dict(), "run_id": inputs.job.run_id}),
    )  # fmt: skip
    return json_safe(
        {
            "measured_kwh": own[0],
            "estimated_kwh": estimated,
            "joules_per_sample_before": None if before is None else before.joules_per_sample_epoch,
            "joules_per_sample_after": refitted.joules_per_sample,
            "overhead_joules_after": refitted.overhead_joules,
            "spread": refitted.spread,
            "runs": refitted.runs,
        }
    )


def record_retrain_success(
    db: Database,
    inputs: RetrainInputs,
    result: RetrainResult,
    new_version: NewVersion | None,
    cost_model: CostModel | None,
    notes: list[str] | None = None,
) -> RetrainOutcome:
    """Store the finished run, settle the ledger, register the new versions; one transaction."""
    from shiftcost.store import ledger, repository, runs

    job = inputs.job
    assert result.energy is not None
    kwh, co2 = result.energy.energy_kwh, result.energy.emissions_kg
    notes = list(notes or []) + _rate_mismatch_notes(inputs, result)
    stopped = result.status == RetrainStatus.STOPPED_BY_BUDGET
    if stopped:
        notes.append(f"stopped by the budget guard: {result.stop_reason}")
        new_version = None  # a stopped run never reached the cutoff; the model stays as it was
    with db.session() as session:
        try:
            if stopped:
                guarded_update(session, job.claim, status=BatchStatus.STOPPED_BY_BUDGET, failure_reason=f"Stopped by the budget guard: {result.stop_reason}")
            else:
                guarded_update(session, job.claim, status=BatchStatus.DONE)
        except ClaimLost:
            # Closed as dead while it ran (no heartbeat within the lease): the batch stays
            # failed, but what the run spent is real and is still recorded.
            notes.append("the run was closed as dead while it ran; its measured spend is recorded as a late settlement "
                         "(or in place of the price of its last heartbeat's work) and no new model version is registered")
            new_version = None
        new_model = None
        if new_version is not None:
            new_model = runs.add_version(session, inputs.model_name, inputs.spec, inputs.model_id, job.run_id, new_version)
            notes += _gate_notes(new_model.version, new_version.gate)
        calibration = None
        if cost_model is not None:
            architecture = inputs.spec.architecture
            kept = refitted_forecaster(session, architecture, cost_model, model_name=inputs.model_name)
            calibration = store_cost_model(session, architecture, cost_model, source="refit", model_id=inputs.model_id, forecaster=kept)
        status = result.status if result.status in (RetrainStatus.CAP_REACHED, RetrainStatus.STOPPED_BY_BUDGET) else RetrainStatus.SUCCEEDED
        measures = _run_measures(result)
        priced = runs.closed_as_dead_at_a_price(session, job.run_id)
        energy_rate = refit_energy_rate(session, inputs, result)
        if energy_rate is not None:
            measures["details"] = measures.get("details", {}) | {"energy_rate": energy_rate}
        if notes:
            measures["details"] = measures.get("details", {}) | {"notes": notes}
        repository.finish_retrain_run(session, job.run_id, status, new_model_id=None if new_model is None else new_model.id, **measures)
        settled = ledger.settle_decision(session, job.decision_id, kwh, co2, replaces_priced=priced)
    return RetrainOutcome(
        batch_id=job.batch_id,
        status=status,
        run_id=job.run_id,
        decision_id=job.decision_id,
        epochs=result.epochs,
        steps=result.steps,
        reached_cutoff=result.reached_cutoff,
        energy_kwh=kwh,
        emissions_kg=co2,
        new_model_id=None if new_model is None else new_model.id,
        new_model_version=None if new_model is None else new_model.version,
        new_model_status=None if new_model is None else new_model.status,
        calibration_id=None if calibration is None else calibration.id,
        cost_model_version=None if cost_model is None else cost_model.version_,
        settled=settled,
        notes=notes,
    )


def _shape_key(model_details: Any) -> str | None:
    """The input size of a model version, from the spec its row keeps (None where it keeps none)."""
    from shiftcost.data import ModelSpec

    saved = (model_details or {}).get("spec")
    return None if saved is None else ModelSpec.from_dict(saved).shape_key


def runs_alike(details: list[Any], device: str, threads: int) -> list[dict[str, Any]]:
    """The runs (their ``details``) a rate for ``device`` (``cpu`` or ``cuda``) at ``threads``
    torch threads is fitted on: one kind of device and, on a CPU, one thread count. Runs recorded
    before either was kept are taken to share it."""
    alike = [d for d in details if d and device_kind(d.get("device") or device) == device]
    return alike if device != "cpu" else [d for d in alike if d.get("torch_threads") in (None, threads)]


def _rate_mismatch_notes(inputs: RetrainInputs, result: RetrainResult) -> list[str]:
    """The rate that priced and guarded the run, when it was fitted on another kind of device or,
    for a CPU run, at another torch thread count."""
    rate = None if inputs.forecaster is None else inputs.forecaster.energy_rate
    mismatch = None if rate is None else rate.mismatch(result.device, _trained_threads(result))
    if mismatch is None:
        return []
    what, why = mismatch
    remedy = "calibrate on the workers' device" if what == "device" else f"run the workers at {rate.threads} thread(s) or calibrate at theirs"
    return [f"{why}; {remedy}"]


def _trained_threads(result: RetrainResult) -> int:
    """The torch thread count the run trained at (this process's, for a result that does not record it)."""
    import torch

    return result.torch_threads or torch.get_num_threads()


def _gate_notes(version: int, gate: Gate | None) -> list[str]:
    if gate is not None and not gate.passed:
        return [f"version {version} was rejected: {gate.reason}"]
    if gate is not None and gate.status == ModelStatus.PENDING:
        return [f"version {version} passed the promotion gate and waits for `shiftcost model approve {version}`"]
    return []


def record_retrain_failure(db: Database, job: RetrainJob, error: BaseException, measured: RetrainResult | None = None) -> RetrainOutcome:
    """Mark the run and the batch failed and close the reservation; the model is unchanged.

    Whatever the run measured before it failed is kept on the run (``error.partial`` for a
    crash while training, ``measured`` for a failure after training finished: saving the
    new version to a full or read-only folder, say) and charged to the ledger: the
    reservation is settled with the measured spend, so the ledger's totals stay the sum of
    what the runs measured. Only a failure before anything was measured releases it.
    """
    from shiftcost.redaction import redact_text
    from shiftcost.store import runs

    partial = getattr(error, "partial", None) or measured
    measures = _run_measures(partial if hasattr(partial, "pool_samples") else None)
    message = redact_text(" ".join(str(error).split()) or type(error).__name__)
    with db.session() as session:
        settled, released = runs.record_failure(session, job.claim, job.run_id, job.decision_id, measures, message)
    return RetrainOutcome(
        batch_id=job.batch_id,
        status=RetrainStatus.FAILED,
        run_id=job.run_id,
        decision_id=job.decision_id,
        epochs=measures.get("epochs"),
        steps=measures.get("steps"),
        energy_kwh=measures.get("energy_kwh"),
        emissions_kg=measures.get("emissions_kg"),
        settled=settled,
        released=released,
        error=message,
    )


def fail_stale_retrains(
    db: Database, model_name: str | None, older_than_s: float, now: datetime | None = None, *, decision_ids: Collection[int] | None = None
) -> list[RetrainOutcome]:
    """Close the retrain runs of ``model_name`` (None: of every model; ``decision_ids``: of
    those decisions only) proven dead: ``running`` with no heartbeat (before the first one:
    no start) within the last ``older_than_s`` seconds (the lease).

    Such a run's process was killed (a crash it survived would have recorded itself), so it
    measured nothing. The run and its batch are marked failed, and the decision's
    reservation is settled with the work the run's last heartbeat carried, priced at the
    host's energy rate (a lower bound: work after that beat is not known), or released
    when the run had no rate to price it by or never reported; one transaction per run.
    Should the run still finish, it records its measured spend as a late settlement. Each
    run is closed by a guarded UPDATE, so of racing watchers exactly one closes it.
    Returns what was closed.
    """
    from datetime import timedelta

    from shiftcost.pipeline.lease import Progress
    from shiftcost.store import ledger, runs
    from shiftcost.store.models import utcnow

    now = utcnow() if now is None else now
    lease = timedelta(seconds=older_than_s)
    span = f"{older_than_s / 3600.0:.3g} h" if older_than_s >= 3600 else f"{older_than_s:.3g} s"
    abandoned = f"abandoned: no heartbeat for {span} (its lease), so its process was killed"
    with db.session(readonly=True) as session:
        stale = runs.dead_runs(session, model_name, lease, now, decision_ids)
    closed: list[RetrainOutcome] = []
    for run_id, batch_id, decision_id, reported in stale:
        progress = Progress.from_dict(reported)
        priced = progress is not None and progress.spent_kwh is not None
        message = abandoned if progress is None else (
            f"{abandoned} after {progress.steps} steps ({progress.epochs:.2f} epochs) by its last heartbeat"
            + (f", {progress.spent_kwh:.3g} kWh at the energy rate's price" if priced else "")
        )
        settled: list[int] = []
        released: list[int] = []
        with db.session() as session:
            if not runs.close_dead_run(session, run_id, batch_id, lease, now, message, progress):
                continue  # another watcher closed it, or the run proved alive meanwhile
            if decision_id is not None and progress is not None and progress.spent_kwh is not None:
                settled = ledger.settle_decision(
                    session, decision_id, progress.spent_kwh, progress.spent_kg or 0.0,
                    note=f"retrain run {run_id} {message}", priced=True,
                )
            elif decision_id is not None:
                released = ledger.release_decision(session, decision_id, f"retrain run {run_id} {message}")
        closed.append(RetrainOutcome(
            batch_id, RetrainStatus.FAILED, run_id=run_id, decision_id=decision_id,
            steps=None if progress is None else progress.steps, epochs=None if progress is None else progress.epochs,
            settled=settled, released=released, error=message,
        ))  # fmt: skip
    return closed


def retrain_outcome_of(db: Database, batch_id: int) -> RetrainOutcome:
    """The stored outcome of the latest retraining run of a batch (``not_started`` if none).

    The flows read it back when a finished retrain run's return value is lost.
    """
    from shiftcost.store import repository, runs

    with db.session(readonly=True) as session:
        run = runs.latest_run(session, batch_id)
        if run is None:
            return not_started(db, batch_id)
        new_model = None if run.new_model_id is None else repository.get_model_by_id(session, run.new_model_id)
        settled, released = runs.closing_entries(session, run.decision_id)
        return RetrainOutcome(
            batch_id=batch_id,
            status=run.status,
            run_id=run.id,
            decision_id=run.decision_id,
            epochs=run.epochs,
            steps=run.steps,
            reached_cutoff=run.reached_cutoff,
            energy_kwh=run.energy_kwh,
            emissions_kg=run.emissions_kg,
            new_model_id=run.new_model_id,
            new_model_version=None if new_model is None else new_model.version,
            new_model_status=None if new_model is None else new_model.status,
            settled=settled,
            released=released,
            error=run.error,
        )


def not_started(db: Database, batch_id: int) -> RetrainOutcome:
    """The outcome for a batch that was not waiting for retraining."""
    from shiftcost.store import repository

    with db.session(readonly=True) as session:
        batch = repository.get_batch(session, batch_id)
        return RetrainOutcome(batch_id, "not_started", notes=[f"batch status is {batch.status}"])


