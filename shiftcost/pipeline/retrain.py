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
   (:func:`refit_energy_rate`), the batch done (``shiftcost.pipeline.retrain_record``
   holds the recording steps; their rows are written by ``shiftcost.store.runs``).

Any failure goes to :func:`record_retrain_failure` instead: the run is marked failed with
what it measured up to the crash, the budget reservation is settled with that measure (or
released when nothing was measured), the batch is marked failed, and the model stays as it
was. A process killed outright records nothing itself: the watch closes its run once it is
proven dead (:func:`fail_stale_retrains`) and settles the work its last heartbeat carried,
priced at the host's energy rate (``shiftcost.pipeline.lease``), or releases the
reservation when there was no rate to price it. A crashed run is not retried on its own: it spent
energy, and spending more needs a new decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from shiftcost import landing
from shiftcost.errors import ConfigError, InputError, ShiftcostError
from shiftcost.pipeline.assess import REPORT_FEATURES
from shiftcost.pipeline.claims import Claim, claim
from shiftcost.pipeline.common import Artifacts, carbon_intensity, check_forecaster, json_safe, least_kwh_left, load_cost_model, load_forecaster
from shiftcost.pipeline.retrain_record import (
    RetrainOutcome,
    fail_stale_retrains,
    not_started,
    record_retrain_failure,
    record_retrain_success,
    refit_energy_rate,
    retrain_outcome_of,
)

if TYPE_CHECKING:
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
    "fail_stale_retrains",
    "load_for_retrain",
    "not_started",
    "record_retrain_failure",
    "record_retrain_success",
    "refit_cost_model",
    "refit_energy_rate",
    "retrain_outcome_of",
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
        source_uri, model_id, name, version = batch.source_uri, model_row.id, model_row.name, model_row.version
        labels_uri, fingerprint = batch.labels_uri, batch.fingerprint
        weights, details, architecture = model_row.weights_uri, dict(model_row.details or {}), model_row.architecture
    if stats_row is None or not weights:
        raise ConfigError(f"Model {name} version {version} has no weights file or reference stats registered.")
    model, spec, reference = load_model_and_reference(name, version, weights, stats_row.uri)
    forecaster = None
    if budget_left is not None:
        from shiftcost.recipe import RetrainConfig

        # The batch size the retrain will run at (the model file's recipe applied), as the assessment priced it.
        batch_size = RetrainConfig.from_settings(settings).for_model(spec).recipe.batch_size
        with db.session(readonly=True) as session:
            forecaster = load_forecaster(session, architecture, model_name=name, image_size=spec.shape_key, batch_size=batch_size)
        if forecaster is not None:
            check_forecaster(forecaster, settings, spec)
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
    from shiftcost.recipe import RetrainConfig
    from shiftcost.retrain import retrain_to_cutoff

    data = inputs.data
    config = RetrainConfig.from_settings(settings).for_model(inputs.spec)
    reference = load_replay_data(inputs, config)
    replay = config.recipe.replay_with(reference is not None)
    replay_samples = 0 if reference is None else len(reference)
    guard = budget_guard(inputs, config.cutoff.holdout_fraction, replay, replay_samples, config.caps.max_epochs)
    # The heartbeat prices the work as the guard does: the guard's own price where there is a guard.
    if guard is not None:
        price = guard.price
    elif inputs.forecaster is not None:
        price = inputs.forecaster.retrain_price(
            len(data), replay_fraction=replay, reference_samples=replay_samples,
            holdout_fraction=config.cutoff.holdout_fraction, cap_epochs=config.caps.max_epochs,
        )
    else:
        price = None
    result = retrain_to_cutoff(
        inputs.model,
        data.x,
        data.y,
        config,
        reference_x=None if reference is None else reference.x,
        reference_y=None if reference is None else reference.y,
        reference_accuracy=inputs.reference.accuracy,
        progress=_reporting_progress(inputs.job.run_id, price, None if price is None else carbon_intensity(settings), guard),
        source=f"batch {inputs.source_uri}",
    )
    return result if guard is None else guard.explained(result)


def _reporting_progress(run_id: int, price: Any, kg_per_kwh: float | None, guard: Any) -> Any:
    """The run's ``progress`` callback: it reports the work done so far to the run's heartbeat
    (priced by ``price``, a :class:`~shiftcost.forecast.price.RetrainPrice`, when there is
    one), then lets ``guard`` decide whether the run goes on."""
    from shiftcost.pipeline.lease import Progress, report

    evaluations = 0

    def progress(point: Any, step_cap: int, target: float) -> str | None:
        nonlocal evaluations
        evaluations += 1
        kwh = None if price is None else price.spent_kwh(point.samples_seen, evaluations)
        report(run_id, Progress(point.step, point.epoch, kwh, None if kwh is None or kg_per_kwh is None else kwh * kg_per_kwh))
        return None if guard is None else guard(point, step_cap, target)

    return progress


def budget_guard(
    inputs: RetrainInputs, holdout_fraction: float, replay_fraction: float = 0.0, replay_samples: int = 0, cap_epochs: float | None = None
) -> Any:
    """The in-flight guard against what the budgets had left at reservation, or None.

    ``replay_fraction`` and ``replay_samples`` (the reference samples the run may replay)
    make the guard price every epoch still to come at the pool the run really trains on;
    ``cap_epochs``, the run's epoch cap, is the most it prices (default: the calibrated cap).

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
            initial = forecaster.predict(inputs.features)
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
        replay_fraction=replay_fraction,
        reference_samples=replay_samples,
        cap_epochs=cap_epochs,
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
        stored = load_cost_model(session, inputs.spec.architecture, model_name=inputs.model_name)
    if stored is None:
        return None, f"no cost model is stored for model {inputs.model_name} ({inputs.spec.architecture}), so none was refitted"
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

