"""Retraining a batch the assessment decided to retrain, and learning from what it cost.

1. :func:`claim_retrain` moves the batch from ``assessed`` to ``retraining`` and opens a
   ``retrain_runs`` row, in one transaction, only if its latest decision is ``retrain``;
2. :func:`load_for_retrain` reads the model, the batch, the reference and the indices the
   decision was based on;
3. :func:`execute_retrain` fine-tunes a copy of the model to the cutoff accuracy
   (``shiftcost.retrain.retrain_to_cutoff``, CodeCarbon measuring), under the in-flight
   budget guard (``shiftcost.forecast.guard.BudgetGuard``) against what the budgets had
   left when the run was reserved: a run whose forecast no longer fits is stopped
   (status ``stopped_by_budget``), its spend settled, the model left as it was;
4. :func:`build_new_version` saves the new weights and computes the new version's
   reference stats (over the parent's reference data and the batch), when the run
   reached the cutoff by training;
5. :func:`refit_cost_model` adds the measured run to the cost model and fits a new version;
6. :func:`record_retrain_success` stores it all in one transaction: the finished run, the
   ledger settled with the measured cost, the new model version and its reference stats,
   the new cost model version, the host's energy rate refitted from every measured run
   (:func:`refit_energy_rate`), the batch done.

Any failure goes to :func:`record_retrain_failure` instead: the run is marked failed with
what it measured up to the crash, the budget reservation is settled with that measure (or
released when nothing was measured), the batch is marked failed, and the model stays as it
was. A process killed outright records nothing: the watch closes its run once it is proven
dead (:func:`fail_stale_retrains`) and releases the reservation. A crashed run is not retried on its own: it spent
energy, and spending more needs a new decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from shiftcost import landing
from shiftcost.errors import ConfigError, InputError, ShiftcostError
from shiftcost.statuses import BatchStatus, ModelStatus, RetrainStatus
from shiftcost.pipeline.assess import REPORT_FEATURES
from shiftcost.pipeline.claims import Claim, ClaimLost, claim, guarded_update
from shiftcost.pipeline.common import Artifacts, json_safe, least_kwh_left, load_cost_model, load_forecaster, store_cost_model

if TYPE_CHECKING:
    from datetime import datetime

    from torch import nn

    from shiftcost.config import Settings
    from shiftcost.costmodel import CostModel
    from shiftcost.data import Batch, ModelSpec
    from shiftcost.forecast.forecaster import Forecaster
    from shiftcost.index.reference import ReferenceStats
    from shiftcost.retrain import RetrainResult
    from shiftcost.store import Database

__all__ = [
    "NewVersion",
    "RetrainFailed",
    "RetrainInputs",
    "RetrainJob",
    "RetrainOutcome",
    "build_new_version",
    "claim_retrain",
    "execute_retrain",
    "load_for_retrain",
    "record_retrain_failure",
    "record_retrain_success",
    "refit_cost_model",
    "run_retrain",
    "Gate",
    "promotion_gate",
]


@dataclass(frozen=True)
class RetrainJob:
    """A batch claimed for retraining: its claim, decision and open ``retrain_runs`` row."""

    claim: Claim
    decision_id: int
    run_id: int

    @property
    def batch_id(self) -> int:
        return self.claim.batch_id


@dataclass
class RetrainInputs:
    """What retraining a batch needs, in memory."""

    job: RetrainJob
    model_id: int
    model_name: str
    model_version: int
    model: nn.Module
    spec: ModelSpec
    reference: ReferenceStats
    reference_data_uri: str | None
    data: Batch
    features: dict[str, float]
    source_uri: str
    forecaster: Forecaster | None = None
    budget_left_kwh: float | None = None
    """The least kWh any applicable budget had left when the run was reserved (None: unlimited)."""
    decided_epochs: dict[str, Any] | None = None
    """The epochs forecast the decision was made on (index or probe stage): the guard's start."""


@dataclass(frozen=True)
class Gate:
    """The promotion gate's verdict on a retrained version, with its figures.

    It passes when the retrain reached the target on the new data's held-out split and
    the new version's accuracy on the reference holdout (reference data the retrain did
    not replay) is at least its parent's minus ``tolerance``. ``status`` is the version's:
    ``active``, ``pending`` (passed, waiting for ``shiftcost model approve``) or ``rejected``.
    """

    passed: bool
    status: str
    reached_target: bool
    parent_accuracy: float | None
    new_accuracy: float | None
    holdout_samples: int
    tolerance: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass
class NewVersion:
    """The retrained model's files and reference stats, ready to be registered."""

    weights_path: str
    reference_path: str
    reference_data_path: str
    reference: ReferenceStats
    fingerprint: str
    gate: Gate | None = None


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


class RetrainFailed(ShiftcostError):
    """Retraining a batch failed; the run, the ledger and the batch say so (``outcome``)."""

    exit_code = 1

    def __init__(self, message: str, outcome: RetrainOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


# ----------------------------------------------------------------------------- 1. claim


def claim_retrain(db: Database, batch_id: int) -> RetrainJob | None:
    """Claim an assessed batch whose latest decision is retrain; None if it is not one."""
    from shiftcost.store import repository

    with db.session() as session:
        decision = repository.latest_decision(session, batch_id)
        if decision is None or decision.action != "retrain":
            return None
        taken = claim(session, batch_id, "assessed", "retraining")
        if taken is None:
            return None
        batch = repository.get_batch(session, batch_id)
        run = repository.start_retrain_run(session, batch.model_id, decision_id=decision.id, batch_id=batch_id, samples=batch.samples)
        return RetrainJob(taken, decision.id, run.id)


# ----------------------------------------------------------------------------- 2. load


def load_for_retrain(db: Database, settings: Settings, job: RetrainJob) -> RetrainInputs:
    """The model version the batch was assessed with, the batch, its reference and indices."""
    from shiftcost.data import load_batch
    from shiftcost.pipeline.assess import align_labels, load_model_and_reference
    from shiftcost.pipeline.labels import with_labels
    from shiftcost.store import assessments, repository

    with db.session(readonly=True) as session:
        batch = repository.get_batch(session, job.batch_id)
        model_row = repository.get_model_by_id(session, batch.model_id)
        stats_row = repository.latest_reference_stats(session, model_row.id)
        decision = repository.latest_decision(session, job.batch_id)
        index_run = decided = None
        if decision is not None and decision.cost_prediction is not None:
            stored = decision.cost_prediction
            index_run = assessments.get_index_run(session, stored.index_run_id)
            decided = {
                "median": stored.epochs, "low": stored.epochs_lower, "high": stored.epochs_upper,
                "level": stored.interval_level, "stage": (stored.details or {}).get("stage", "index"),
            }  # fmt: skip
        features = {} if index_run is None else {n: getattr(index_run, n) for n in REPORT_FEATURES if getattr(index_run, n) is not None}
        # What the budgets had left under their lock, before this decision's reservation.
        budget_left = least_kwh_left(None if decision is None else decision.budget_state)
        forecaster = None
        if budget_left is not None:
            from shiftcost.recipe import RetrainConfig

            batch_size = RetrainConfig.from_settings(settings).recipe.batch_size
            forecaster = load_forecaster(session, model_row.architecture, batch_size=batch_size)
        source_uri, model_id, name, version = batch.source_uri, model_row.id, model_row.name, model_row.version
        labels_uri, fingerprint = batch.labels_uri, batch.fingerprint
        weights, details = model_row.weights_uri, dict(model_row.details or {})
    if stats_row is None or not weights:
        raise ConfigError(f"Model {name} version {version} has no weights file or reference stats registered.")
    model, spec, reference = load_model_and_reference(name, version, weights, stats_row.uri)
    with landing.local_copy(source_uri) as path:
        data = load_batch(path, spec=spec)
    data.source = source_uri
    data = with_labels(data, labels_uri, fingerprint)
    data, new_task, unknown = align_labels(data, spec)
    if new_task:
        raise InputError(f"Batch {source_uri} has labels {unknown} the model has no output for; it cannot be retrained on.")
    return RetrainInputs(
        job=job,
        model_id=model_id,
        model_name=name,
        model_version=version,
        model=model,
        spec=spec,
        reference=reference,
        reference_data_uri=details.get("reference_data_uri"),
        data=data,
        features=features,
        source_uri=source_uri,
        forecaster=forecaster,
        budget_left_kwh=budget_left,
        decided_epochs=decided,
    )


# ----------------------------------------------------------------------------- 3. retrain


def execute_retrain(settings: Settings, inputs: RetrainInputs) -> RetrainResult:
    """Fine-tune a copy of the model on the batch to the reference accuracy minus the tolerance.

    With a budget and a forecaster the run is guarded (:func:`budget_guard`); a run the
    guard stops has status ``stopped_by_budget`` and the guard's sentence as its
    ``stop_reason``.
    """
    import dataclasses

    from shiftcost.retrain import retrain_to_cutoff

    from shiftcost.recipe import RetrainConfig

    data = inputs.data
    config = RetrainConfig.from_settings(settings).for_model(inputs.spec)
    reference = load_replay_data(inputs, config)
    guard = budget_guard(inputs, config.cutoff.holdout_fraction)
    result = retrain_to_cutoff(
        inputs.model,
        data.x,
        data.y,
        config,
        reference_x=None if reference is None else reference.x,
        reference_y=None if reference is None else reference.y,
        reference_accuracy=inputs.reference.accuracy,
        progress=guard,
        source=f"batch {inputs.source_uri}",
    )
    if guard is not None and result.status == "stopped_by_budget" and guard.reason:
        result = dataclasses.replace(result, stop_reason=guard.reason)
    return result


def budget_guard(inputs: RetrainInputs, holdout_fraction: float) -> Any:
    """The in-flight guard against what the budgets had left at reservation, or None.

    None when no budget limits kWh or no cost model with an energy rate is stored. The
    initial forecast is the one the decision was made on (index or probe stage), else the
    index model's for this batch; the guard refines it from the run's own evaluations when
    a probe stage is stored.
    """
    import math

    from shiftcost.forecast.forecaster import Forecast, Interval
    from shiftcost.forecast.guard import BudgetGuard

    forecaster = inputs.forecaster
    if inputs.budget_left_kwh is None or forecaster is None or forecaster.energy_rate is None or inputs.reference.accuracy is None:
        return None
    decided = inputs.decided_epochs
    initial: Forecast | None = None
    if decided is not None and decided["median"] is not None:
        epochs = Interval(
            decided["median"],
            decided["low"] if decided["low"] is not None else 0.0,
            decided["high"] if decided["high"] is not None else math.inf,
            decided["level"] or forecaster.level,
        )
        initial = Forecast(epochs, None, None, decided["stage"], False, None, {})
    else:
        try:
            initial = forecaster.predict(inputs.features, batch_samples=len(inputs.data))
        except InputError:
            initial = None  # the indices the cost model needs are missing: only spend is watched
    return BudgetGuard(
        forecaster,
        budget_kwh=inputs.budget_left_kwh,
        batch_samples=len(inputs.data),
        ceiling=float(inputs.reference.accuracy),
        features=inputs.features or None,
        initial=initial,
        holdout_fraction=holdout_fraction,
    )


def load_replay_data(inputs: RetrainInputs, config: Any) -> Batch | None:
    """The version's reference data less its gate holdout, when the recipe replays it (its default does)."""
    from shiftcost.data import Batch

    if not inputs.reference_data_uri or config.recipe.replay_with(True) <= 0:
        return None
    reference = load_reference_data(inputs)
    if reference.y is None:
        return None
    replay, _ = reference_split(len(reference), config.seed)
    return Batch(reference.x[replay], reference.y[replay], reference.source)


def load_reference_data(inputs: RetrainInputs) -> Batch:
    """The version's stored reference data (its bounded replay sample), wherever it is kept."""
    from shiftcost.artifacts import reading
    from shiftcost.data import load_batch

    assert inputs.reference_data_uri
    with reading(inputs.reference_data_uri) as path:
        return load_batch(path, spec=inputs.spec)


#: Share of a version's reference data kept out of replay, to judge the promotion gate on.
GATE_HOLDOUT_FRACTION = 0.2


def reference_split(samples: int, seed: int) -> tuple[Any, Any]:
    """Seeded (replay, gate holdout) index split of a version's reference data."""
    import torch

    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + 7919))
    n_holdout = max(1, int(round(samples * GATE_HOLDOUT_FRACTION))) if samples > 1 else 0
    return order[n_holdout:].sort().values, order[:n_holdout].sort().values


def promotion_gate(settings: Settings, inputs: RetrainInputs, result: RetrainResult) -> Gate:
    """Judge the retrained model against its parent on the reference holdout (see :class:`Gate`)."""
    from shiftcost.data.importing import accuracy_of
    from shiftcost.retrain import resolve_device

    tolerance = settings.promotion_tolerance
    reached = bool(result.reached_cutoff and result.steps > 0)
    parent_accuracy = new_accuracy = None
    holdout_samples = 0
    if inputs.reference_data_uri and result.model is not None:
        reference = load_reference_data(inputs)
        if reference.y is not None:
            _, holdout = reference_split(len(reference), settings.retrain_seed)
            x, y = reference.x[holdout], reference.y[holdout]
            holdout_samples = len(holdout)
            parent_accuracy = accuracy_of(inputs.model, x, y, device=resolve_device(settings.device))
            new_accuracy = accuracy_of(result.model, x, y, device=resolve_device(settings.device))
    if not reached:
        reason = f"the retrain did not reach the target accuracy {result.target_accuracy:.3f} on the new data"
    elif parent_accuracy is not None and new_accuracy < parent_accuracy - tolerance:
        reason = (
            f"it is worse than its parent on the reference holdout ({new_accuracy:.3f} against {parent_accuracy:.3f}, "
            f"tolerance {tolerance:g}, {holdout_samples} images)"
        )
    else:
        reason = "reached the target on the new data" + (
            "" if parent_accuracy is None else f" and kept the reference holdout accuracy ({new_accuracy:.3f} against {parent_accuracy:.3f})"
        )
        status = "pending" if settings.promotion_approval == "manual" else "active"
        return Gate(True, status, reached, parent_accuracy, new_accuracy, holdout_samples, tolerance, reason)
    return Gate(False, "rejected", reached, parent_accuracy, new_accuracy, holdout_samples, tolerance, reason)


# ----------------------------------------------------------------------------- 4. new version


def produces_new_version(result: RetrainResult) -> bool:
    """Only a run that reached the cutoff by training changed the model for the better."""
    return result.status == "reached" and result.steps > 0


def build_new_version(settings: Settings, inputs: RetrainInputs, result: RetrainResult) -> NewVersion | None:
    """Save the retrained weights and compute their reference stats; None if nothing changed.

    The new version's reference data is drawn from its parent's replay sample and the
    batch it was retrained on (the data it is now expected to serve), at most
    ``reference_replay_samples`` images: what a version stores does not grow with history.
    """
    import torch

    from shiftcost.artifacts import bounded_sample, remove, writing
    from shiftcost.data import Batch, model_fingerprint, save_batch, save_model

    if not produces_new_version(result):
        return None
    assert result.model is not None
    artifacts = Artifacts.from_settings(settings)
    tag = f"run-{inputs.job.run_id}"
    written: list[str] = []
    try:
        weights_path = artifacts.model_weights(inputs.model_name, tag)
        with writing(weights_path) as path:
            written.append(weights_path)
            save_model(result.model.cpu(), inputs.spec, path)
        x, y = inputs.data.x, inputs.data.y
        if inputs.reference_data_uri:
            parent = load_reference_data(inputs)
            x, y = torch.cat([parent.x, x]), torch.cat([parent.y, y])
        x, y = bounded_sample(x, y, settings.reference_replay_samples, settings.retrain_seed + inputs.job.run_id)
        data_path = artifacts.reference_data(inputs.model_name, tag)
        with writing(data_path) as path:
            written.append(data_path)
            save_batch(Batch(x, y, "reference"), path)
        reference_path = artifacts.reference_stats(inputs.model_name, tag)
        written.append(reference_path)
        reference = _new_reference(settings, inputs, result, x, y, reference_path)
        gate = promotion_gate(settings, inputs, result)
    except BaseException:
        for url in written:  # no version is registered, so none of its files may stay behind
            remove(url)
        raise
    return NewVersion(weights_path, reference_path, data_path, reference, model_fingerprint(result.model), gate)


def _new_reference(settings: Settings, inputs: RetrainInputs, result: RetrainResult, x: Any, y: Any, url: str) -> ReferenceStats:
    from shiftcost.artifacts import writing
    from shiftcost.index.engine import compute_reference_stats

    reference = compute_reference_stats(
        result.model,
        inputs.spec,
        x,
        y,
        layers=inputs.reference.layers,
        device=settings.device,
        max_samples=inputs.reference.max_samples,
        seed=inputs.reference.seed,
        bins=inputs.reference.bins,
    )
    with writing(url) as path:
        reference.save(path)
    return reference


# ----------------------------------------------------------------------------- 5. refit


def refit_cost_model(db: Database, inputs: RetrainInputs, result: RetrainResult) -> tuple[CostModel | None, str | None]:
    """The cost model refitted with this run (censored when the cap stopped it), or why not."""
    with db.session(readonly=True) as session:
        stored = load_cost_model(session, inputs.spec.architecture)
    if stored is None:
        return None, f"no cost model is stored for {inputs.spec.architecture}, so none was refitted"
    cost_model, _ = stored
    row = dict(inputs.features)
    row.update(
        epochs=result.epochs,
        reached_cutoff=result.reached_cutoff,
        samples=result.pool_samples,
        energy_kwh=result.energy_kwh,
        source="retrain",
        batch_id=inputs.job.batch_id,
        run_id=inputs.job.run_id,
    )
    try:
        cost_model.refit([row], note=f"retrain run {inputs.job.run_id} on batch {inputs.job.batch_id}")
    except InputError as error:
        return None, f"the cost model was not refitted: {error}"
    return cost_model, None


# ----------------------------------------------------------------------------- 6. record


def _run_measures(result: RetrainResult | None) -> dict[str, Any]:
    from shiftcost.store import runs

    return runs.run_columns(result)


def refit_energy_rate(session: Any, inputs: RetrainInputs, result: RetrainResult) -> dict[str, Any] | None:
    """Refit the architecture's energy rate from every finished run that measured energy.

    The rate (joules per training sample, evaluations weighted by
    ``EVAL_SAMPLE_WEIGHT``) is the *median* over the runs (``HostEnergyRate.fit``): one run
    on a loaded machine does not move it far. It is stored as the architecture's newest
    energy probe, which the next assessment and the next guard price with. Returns the run's
    measured kWh beside what the rate in force before it estimated, and the rates; None when
    the run measured no energy.
    """
    from shiftcost.energy import HostEnergyRate, run_work
    from shiftcost.store import repository, runs

    own = run_work(result.to_dict())
    if own[0] is None or own[0] <= 0:
        return None
    architecture = inputs.spec.architecture
    earlier = runs.measured_run_details(session, architecture, except_run=inputs.job.run_id)
    works = [run_work(details) for details in earlier if details] + [own]
    refitted = HostEnergyRate.fit(works, hardware=f"refitted from {len(works)} retrain runs")
    before = repository.latest_energy_probe(session, architecture)
    estimated = None
    if before is not None:
        estimated = HostEnergyRate(float(before.joules_per_sample_epoch), 0.0, 1).kwh(own[1], own[2])
    repository.add_energy_probe(
        session, architecture, refitted.hardware or "refitted", f"{inputs.spec.in_channels}x{inputs.spec.image_size}x{inputs.spec.image_size}",
        refitted.joules_per_sample, measurement_method="refitted", energy_kwh=own[0],
        details=json_safe({"rate": refitted.to_dict(), "run_id": inputs.job.run_id}),
    )  # fmt: skip
    return json_safe(
        {
            "measured_kwh": own[0],
            "estimated_kwh": estimated,
            "joules_per_sample_before": None if before is None else before.joules_per_sample_epoch,
            "joules_per_sample_after": refitted.joules_per_sample,
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
    notes = list(notes or [])
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
            notes.append("the run was closed as dead while it ran; its spend is recorded as a late settlement "
                         "and no new model version is registered")
            new_version = None
        new_model = None
        if new_version is not None:
            new_model = runs.add_version(session, inputs.model_name, inputs.spec, inputs.model_id, job.run_id, new_version)
            notes += _gate_notes(new_model.version, new_version.gate)
        calibration = None
        if cost_model is not None:
            calibration = store_cost_model(session, inputs.spec.architecture, cost_model, source="refit", model_id=inputs.model_id)
        status = result.status if result.status in (RetrainStatus.CAP_REACHED, RetrainStatus.STOPPED_BY_BUDGET) else RetrainStatus.SUCCEEDED
        measures = _run_measures(result)
        energy_rate = refit_energy_rate(session, inputs, result)
        if energy_rate is not None:
            measures["details"] = measures.get("details", {}) | {"energy_rate": energy_rate}
        if notes:
            measures["details"] = measures.get("details", {}) | {"notes": notes}
        repository.finish_retrain_run(session, job.run_id, status, new_model_id=None if new_model is None else new_model.id, **measures)
        settled = ledger.settle_decision(session, job.decision_id, kwh, co2)
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


def fail_stale_retrains(db: Database, model_name: str, older_than_s: float, now: datetime | None = None) -> list[RetrainOutcome]:
    """Close the retrain runs of ``model_name`` proven dead: ``running`` with no heartbeat
    (before the first one: no start) within the last ``older_than_s`` seconds (the lease).

    Such a run's process was killed (a crash it survived would have recorded itself): the
    run and its batch are marked failed and the decision's reservation is released, in one
    transaction per run. The energy it spent is unknown and not charged (should the run
    still finish, it records its spend as a late settlement). Each run is closed by a
    guarded UPDATE, so of racing watchers exactly one closes it. Returns what was closed;
    ``released`` is empty when there was nothing left to release.
    """
    from datetime import timedelta

    from shiftcost.store import ledger, runs
    from shiftcost.store.models import utcnow

    now = utcnow() if now is None else now
    lease = timedelta(seconds=older_than_s)
    span = f"{older_than_s / 3600.0:.3g} h" if older_than_s >= 3600 else f"{older_than_s:.3g} s"
    message = f"abandoned: no heartbeat for {span} (its lease), so its process was killed"
    with db.session(readonly=True) as session:
        stale = runs.dead_runs(session, model_name, lease, now)
    closed: list[RetrainOutcome] = []
    for run_id, batch_id, decision_id in stale:
        with db.session() as session:
            if not runs.close_dead_run(session, run_id, batch_id, lease, now, message):
                continue  # another watcher closed it, or the run proved alive meanwhile
            released = [] if decision_id is None else ledger.release_decision(session, decision_id, f"retrain run {run_id} {message}")
        closed.append(RetrainOutcome(batch_id, RetrainStatus.FAILED, run_id=run_id, decision_id=decision_id, released=released, error=message))
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


def run_retrain(db: Database, settings: Settings, batch_id: int) -> RetrainOutcome:
    """Retrain on a batch decided for retraining, once; raises ``RetrainFailed`` after recording a failure."""
    from shiftcost.pipeline.lease import heartbeat

    job = claim_retrain(db, batch_id)
    if job is None:
        return not_started(db, batch_id)
    result = None
    try:
        with heartbeat(db, job.run_id, settings.retrain_heartbeat_s):
            inputs = load_for_retrain(db, settings, job)
            result = execute_retrain(settings, inputs)
            new_version = build_new_version(settings, inputs, result)
            cost_model, note = refit_cost_model(db, inputs, result)
            return record_retrain_success(db, inputs, result, new_version, cost_model, [note] if note else None)
    except BaseException as error:
        try:
            outcome = record_retrain_failure(db, job, error, result)
        except Exception:
            # The database is out of reach too: the run stays open and its reservation held
            # until `shiftcost budget release-open` closes it; the original error matters more.
            raise error from None
        if not isinstance(error, Exception):
            raise  # Ctrl-C and exits keep their meaning, after the bookkeeping
        raise RetrainFailed(f"Retraining batch {batch_id} failed and was recorded as failed: {outcome.error}", outcome) from error
