"""Repository functions: the only way the rest of shiftcost writes and reads its history.

Every function takes an open ``Session`` first and leaves committing to the caller
(``with db.session() as session: ...`` commits when the block ends), so a task can
write several rows in one transaction and nothing is half-written when it fails.

Measurement fields are passed as keyword arguments named like the columns in
``shiftcost.store.models``; an unknown name raises ``TypeError`` (a programming error,
not a user error). NumPy scalars are accepted and stored as plain Python numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shiftcost.errors import InputError
from shiftcost.redaction import redact_text
from shiftcost.statuses import BatchStatus, DecisionAction, ModelStatus, RetrainStatus
from shiftcost.store.errors import NotFoundError
from shiftcost.store.models import (
    BATCH_STATUSES,
    MODEL_STATUSES,
    CALIBRATION_SOURCES,
    DECISION_ACTIONS,
    RETRAIN_STATUSES,
    Base,
    Batch,
    Calibration,
    CostPrediction,
    Decision,
    DriftReport,
    EnergyProbe,
    IndexRun,
    Model,
    ReferenceStats,
    RetrainRun,
    utcnow,
)

Row = TypeVar("Row", bound=Base)

# Columns a caller may never set through **values: keys and bookkeeping.
_PROTECTED = frozenset({"id", "created_at", "registered_at", "updated_at"})


def _plain(value: Any) -> Any:
    """NumPy scalars (and 0-d arrays) to Python scalars; the drivers cannot bind them."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _assign(row: Row, values: Mapping[str, Any]) -> Row:
    columns = row.__table__.columns
    for name, value in values.items():
        if name not in columns or name in _PROTECTED:
            raise TypeError(f"{type(row).__name__} has no settable column {name!r}")
        setattr(row, name, _plain(value))
    return row


def _add(session: Session, row: Row) -> Row:
    session.add(row)
    session.flush()
    return row


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise InputError(f"Unknown {what} {value!r}; use one of {', '.join(allowed)}.")
    return value


# --- models and reference statistics -------------------------------------------------


def register_model(
    session: Session,
    name: str,
    architecture: str,
    *,
    version: int | None = None,
    weights_uri: str | None = None,
    layers: Iterable[str] = (),
    classes: Iterable[Any] | None = None,
    parent_id: int | None = None,
    fingerprint: str | None = None,
    details: dict[str, Any] | None = None,
    status: str = ModelStatus.ACTIVE,
) -> Model:
    """Add a model version; ``version`` defaults to one more than the newest of ``name``."""
    _check_choice(status, MODEL_STATUSES, "model status")
    if not name.strip():
        raise InputError("A model needs a non-empty name.")
    if version is None:
        newest = session.scalar(select(func.max(Model.version)).where(Model.name == name))
        version = (newest or 0) + 1
    model = Model(
        name=name,
        version=version,
        architecture=architecture,
        weights_uri=weights_uri,
        layers=list(layers),
        classes=None if classes is None else [_plain(c) for c in classes],
        parent_id=parent_id,
        fingerprint=fingerprint,
        details=details,
        status=status,
    )
    return _add(session, model)


def get_model(session: Session, name: str, version: int | None = None) -> Model:
    """A model version by name; when ``version`` is None, the current one: the newest
    ``active`` version (rejected and pending versions never serve)."""
    query = select(Model).where(Model.name == name)
    query = query.where(Model.version == version) if version is not None else query.where(Model.status == ModelStatus.ACTIVE)
    model = session.scalars(query.order_by(Model.version.desc()).limit(1)).first()
    if model is None:
        which = f"{name} version {version}" if version is not None else name
        raise NotFoundError(f"No model {which} is registered; register it first or check the name.")
    return model


def get_model_by_id(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFoundError(f"No model with id {model_id} is registered.")
    return model


def add_reference_stats(
    session: Session,
    model_id: int,
    uri: str,
    fingerprint: str,
    samples: int,
    *,
    accuracy: float | None = None,
    details: dict[str, Any] | None = None,
) -> ReferenceStats:
    """Record where the reference summary of a model version is stored."""
    row = ReferenceStats(model_id=model_id, uri=uri, fingerprint=fingerprint)
    return _add(session, _assign(row, {"samples": samples, "accuracy": accuracy, "details": details}))


def latest_reference_stats(session: Session, model_id: int) -> ReferenceStats | None:
    """The newest reference summary of a model version, if any."""
    query = (
        select(ReferenceStats)
        .where(ReferenceStats.model_id == model_id)
        .order_by(ReferenceStats.created_at.desc(), ReferenceStats.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


# --- batches ---------------------------------------------------------------------------


def register_batch(
    session: Session,
    model_id: int,
    source_uri: str,
    fingerprint: str,
    samples: int,
    has_labels: bool,
) -> tuple[Batch, bool]:
    """Register a batch once per model name and content fingerprint.

    Returns ``(batch, created)``; ``created`` is False when the fingerprint was already
    registered for this model name (by any version), in which case the existing row is
    returned unchanged. Safe under concurrency: the insert is ``INSERT .. ON CONFLICT DO
    NOTHING`` on the unique (model_name, fingerprint) key, so racing callers get one row.
    A known fingerprint is looked up first: on PostgreSQL even a conflicting insert draws
    an id from the sequence, and a poll that registers nothing must not use ids up.
    """
    if samples < 0:
        raise InputError(f"The batch {source_uri} has a negative sample count ({samples}).")
    model = get_model_by_id(session, model_id)
    known = find_batch(session, model.name, fingerprint)
    if known is not None:
        return known, False
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    now = utcnow()
    statement = (
        insert(Batch)
        .values(
            model_id=model_id,
            model_name=model.name,
            source_uri=source_uri,
            fingerprint=fingerprint,
            samples=int(_plain(samples)),
            has_labels=bool(has_labels),
            status=BatchStatus.REGISTERED,
            registered_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["model_name", "fingerprint"])
        .returning(Batch.id)
    )
    inserted_id = session.execute(statement).scalar()
    batch = find_batch(session, model.name, fingerprint)
    assert batch is not None  # the row exists: inserted now or by whoever won the race
    return batch, inserted_id is not None


def find_batch(session: Session, model_name: str, fingerprint: str) -> Batch | None:
    """The batch registered for ``model_name`` with this fingerprint, if any."""
    query = select(Batch).where(Batch.model_name == model_name, Batch.fingerprint == fingerprint)
    return session.scalars(query.execution_options(populate_existing=True)).first()


def get_batch(session: Session, batch_id: int) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"No batch with id {batch_id} is registered.")
    return batch


def set_batch_status(
    session: Session, batch_id: int, status: str, failure_reason: str | None = None
) -> Batch:
    """Move a batch to ``status``; ``failed`` requires a reason, other statuses clear it."""
    _check_choice(status, BATCH_STATUSES, "batch status")
    if status == BatchStatus.FAILED and not failure_reason:
        raise InputError("A batch marked failed needs a failure reason.")
    batch = get_batch(session, batch_id)
    batch.status = status
    batch.failure_reason = redact_text(failure_reason) if status == BatchStatus.FAILED else None
    session.flush()
    return batch


# --- assessment: drift, indices, predictions, decisions --------------------------------


def add_drift_report(
    session: Session,
    batch_id: int,
    method: str,
    feature_set: str,
    drift_detected: bool,
    **values: Any,
) -> DriftReport:
    """Store one drift test (score, threshold(s), per-feature details, HTML report location)."""
    row = DriftReport(batch_id=batch_id, method=method, feature_set=feature_set,
                      drift_detected=bool(drift_detected))
    return _add(session, _assign(row, values))


def add_index_run(session: Session, batch_id: int, model_id: int, samples: int, **values: Any) -> IndexRun:
    """Store the indices of one batch (``resque_dist=..., inv_ari=..., device=..., seconds=...``)."""
    row = IndexRun(batch_id=batch_id, model_id=model_id, samples=int(_plain(samples)))
    return _add(session, _assign(row, values))


def add_cost_prediction(
    session: Session,
    index_run_id: int,
    epochs: float,
    energy_kwh: float,
    emissions_kg: float,
    **values: Any,
) -> CostPrediction:
    """Store a cost prediction: point values here, ``*_lower``/``*_upper``, level, etc. as keywords."""
    row = CostPrediction(index_run_id=index_run_id)
    values = {"epochs": epochs, "energy_kwh": energy_kwh, "emissions_kg": emissions_kg, **values}
    return _add(session, _assign(row, values))


def record_decision(
    session: Session,
    batch_id: int,
    action: str,
    reasons: Iterable[Any],
    *,
    cost_prediction_id: int | None = None,
    blocked_by_budget: bool = False,
    budget_state: list[Any] | None = None,
    policy: dict[str, Any] | None = None,
    retry_after: datetime | None = None,
) -> Decision:
    """Store a retrain/skip/defer decision with every reason and the budget state it saw.

    ``blocked_by_budget`` marks decisions where a budget rule is why the batch was not
    retrained (``shiftcost audit decisions --skipped-for-budget`` lists them). A ``defer``
    may carry ``retry_after``: the watcher assesses the batch again from then on.
    """
    _check_choice(action, DECISION_ACTIONS, "decision action")
    reasons = list(reasons)
    if not reasons:
        raise InputError("A decision needs at least one reason.")
    batch = get_batch(session, batch_id)
    row = Decision(
        batch_id=batch_id,
        model_id=batch.model_id,
        cost_prediction_id=cost_prediction_id,
        action=action,
        reasons=reasons,
        blocked_by_budget=bool(blocked_by_budget),
        budget_state=budget_state,
        policy=policy,
        retry_after=retry_after if action == DecisionAction.DEFER else None,
    )
    return _add(session, row)


def latest_decision(session: Session, batch_id: int) -> Decision | None:
    """The newest decision taken on a batch, if any."""
    query = select(Decision).where(Decision.batch_id == batch_id)
    return session.scalars(query.order_by(Decision.created_at.desc(), Decision.id.desc()).limit(1)).first()


# --- retraining ------------------------------------------------------------------------


def start_retrain_run(session: Session, model_id: int, **values: Any) -> RetrainRun:
    """Open a retrain run (status ``running``); ``decision_id``, ``batch_id`` etc. as keywords."""
    row = RetrainRun(model_id=model_id, status=RetrainStatus.RUNNING)
    return _add(session, _assign(row, values))


def finish_retrain_run(
    session: Session,
    run_id: int,
    status: str,
    *,
    finished_at: datetime | None = None,
    **measures: Any,
) -> RetrainRun:
    """Close a retrain run with its status (succeeded / failed / cap_reached) and measures."""
    _check_choice(status, RETRAIN_STATUSES, "retrain status")
    if status == RetrainStatus.RUNNING:
        raise InputError("finish_retrain_run needs a final status, not 'running'.")
    run = session.get(RetrainRun, run_id)
    if run is None:
        raise NotFoundError(f"No retrain run with id {run_id} exists.")
    _assign(run, measures)
    run.status = status
    run.finished_at = finished_at or utcnow()
    session.flush()
    return run


# --- cost model history and energy probes ------------------------------------------------


def add_calibration(
    session: Session,
    architecture: str,
    source: str,
    fit_data: dict[str, Any],
    parameters: dict[str, Any],
    *,
    n_points: int,
    **values: Any,
) -> Calibration:
    """Store a new cost-model version for ``architecture`` (version = previous + 1).

    Two writers racing for the same version number make one fail on the unique
    (architecture, version) key rather than both succeed; retry the transaction.
    """
    _check_choice(source, CALIBRATION_SOURCES, "calibration source")
    newest = session.scalar(
        select(func.max(Calibration.version)).where(Calibration.architecture == architecture)
    )
    row = Calibration(
        architecture=architecture,
        version=(newest or 0) + 1,
        source=source,
        n_points=int(_plain(n_points)),
        fit_data=fit_data,
        parameters=parameters,
    )
    return _add(session, _assign(row, values))


def latest_calibration(session: Session, architecture: str, *, model_name: str | None) -> Calibration | None:
    """The newest cost-model version for an architecture, if any.

    With ``model_name``, the newest of those stored for that model's versions or for the
    architecture as a whole (no model): two models of one architecture learn at their own
    pace on their own data and recipes, so neither forecasts with the other's calibration.
    Without it, the architecture's newest, whichever model it came from.
    """
    query = select(Calibration).where(Calibration.architecture == architecture)
    if model_name is not None:
        own = select(Model.id).where(Model.name == model_name)
        query = query.where(or_(Calibration.model_id.in_(own), Calibration.model_id.is_(None)))
    return session.scalars(query.order_by(Calibration.version.desc()).limit(1)).first()


def calibration_history(session: Session, architecture: str) -> list[Calibration]:
    """Every cost-model version for an architecture, oldest first."""
    query = select(Calibration).where(Calibration.architecture == architecture)
    return list(session.scalars(query.order_by(Calibration.version)))


def add_energy_probe(
    session: Session,
    architecture: str,
    hardware: str,
    image_size: str,
    joules_per_sample_epoch: float,
    **values: Any,
) -> EnergyProbe:
    """Store a joules-per-sample-epoch measurement for (architecture, hardware, image size)."""
    if not joules_per_sample_epoch >= 0:
        raise InputError(
            f"Joules per sample-epoch must be a non-negative number, got {joules_per_sample_epoch}."
        )
    row = EnergyProbe(architecture=architecture, hardware=hardware, image_size=image_size,
                      joules_per_sample_epoch=float(joules_per_sample_epoch))
    return _add(session, _assign(row, values))


def latest_energy_probe(
    session: Session, architecture: str, hardware: str | None = None, image_size: str | None = None
) -> EnergyProbe | None:
    """The newest probe for an architecture (optionally on given hardware / image size)."""
    query = select(EnergyProbe).where(EnergyProbe.architecture == architecture)
    if hardware is not None:
        query = query.where(EnergyProbe.hardware == hardware)
    if image_size is not None:
        query = query.where(EnergyProbe.image_size == image_size)
    query = query.order_by(EnergyProbe.measured_at.desc(), EnergyProbe.id.desc()).limit(1)
    return session.scalars(query).first()


def model_versions(session: Session, name: str | None = None) -> list[Model]:
    """Every version (of ``name``, or of every model), by name then version."""
    query = select(Model)
    if name is not None:
        query = query.where(Model.name == name)
    return list(session.scalars(query.order_by(Model.name, Model.version)))


def set_model_status(session: Session, model_id: int, status: str) -> Model:
    model = get_model_by_id(session, model_id)
    model.status = _check_choice(status, MODEL_STATUSES, "model status")
    session.flush()
    return model
