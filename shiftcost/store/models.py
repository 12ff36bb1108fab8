"""ORM models: the tables that keep every decision explainable later.

One batch flows through the tables in this order::

    models ──< reference_stats
      │
      └──< batches ──< drift_reports
              │
              └──< index_runs ──< cost_predictions >── calibrations
                                        │
              decisions >───────────────┘ (cost_prediction_id)
                 │   │
                 │   └──< budget_ledger >── budgets   (reserve / settle / release)
                 └──< retrain_runs ──> models (new_model_id)

    energy_probes: measured joules per sample-epoch per (architecture, hardware).

Conventions: every timestamp is ``DateTime(timezone=True)`` and holds UTC (``UTCDateTime``
converts on the way in and out, SQLite included); kinds and statuses are short strings
guarded by CHECK constraints rather than database enum types, so migrations stay simple
on both SQLite and PostgreSQL; JSON columns are ``JSON`` (``JSONB`` on PostgreSQL).
History is never deleted, so foreign keys do not cascade.

The schema is frozen in ``migrations/versions``: change a model here only together with
a new Alembic revision (a test compares the two).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shiftcost.statuses import (
    BatchStatus,
    BudgetPeriod,
    CalibrationSource,
    DecisionAction,
    LandingEntryKind,
    LandingEntryState,
    LedgerKind,
    ModelStatus,
    RetrainStatus,
    values,
)

# The allowed values of each CHECK constraint come from the enums in shiftcost.statuses.
BATCH_STATUSES = values(BatchStatus)
MODEL_STATUSES = values(ModelStatus)
DECISION_ACTIONS = values(DecisionAction)
RETRAIN_STATUSES = values(RetrainStatus)
CALIBRATION_SOURCES = values(CalibrationSource)
BUDGET_PERIODS = values(BudgetPeriod)
LEDGER_KINDS = values(LedgerKind)
LANDING_ENTRY_STATES = values(LandingEntryState)
LANDING_ENTRY_KINDS = values(LandingEntryKind)

# Deterministic constraint names, so migrations can drop and alter them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp stored in UTC on every backend.

    SQLite has no time zone type: values are stored as naive UTC text and come back
    with ``tzinfo=UTC``. A naive datetime given by a caller is taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL text of a CHECK that ``column`` holds one of ``values`` (constants, not input)."""
    listed = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({listed})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


class Model(Base):
    """One version of a deployed model (a retrain adds a new version with ``parent_id``)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"), CheckConstraint(_one_of("status", MODEL_STATUSES), name="status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    architecture: Mapped[str] = mapped_column(String(200))
    weights_uri: Mapped[str | None] = mapped_column(Text)
    layers: Mapped[list[Any]] = mapped_column(default=list)
    classes: Mapped[list[Any] | None]
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(20), default="active", server_default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped[Model | None] = relationship(remote_side=[id])


class ReferenceStats(Base):
    """Where the cached reference summary of a model version lives, and what it covers."""

    __tablename__ = "reference_stats"
    __table_args__ = (Index(None, "model_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    uri: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))
    samples: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship()


class Batch(Base):
    """A batch of new data, registered once per model name by its content fingerprint.

    ``model_name`` repeats ``models.name`` on purpose: uniqueness is per model *name*, so
    a batch already seen by version 1 is not processed again after a retrain to version 2.
    """

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("model_name", "fingerprint"),
        CheckConstraint(_one_of("status", BATCH_STATUSES), name="status"),
        CheckConstraint("samples >= 0", name="samples_nonnegative"),
        Index(None, "model_id", "registered_at"),
        Index(None, "status"),
        # What a poll asks (a model's pending or deferred batches) must not scan its history.
        Index(None, "model_name", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    model_name: Mapped[str] = mapped_column(String(200))
    source_uri: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))
    samples: Mapped[int] = mapped_column(Integer)
    has_labels: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(20), default="registered")
    failure_reason: Mapped[str | None] = mapped_column(Text)
    labels_uri: Mapped[str | None] = mapped_column(Text)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    model: Mapped[Model] = relationship()


class LandingEntry(Base):
    """One entry seen in the landing area, known by its location and metadata signature.

    A poll skips an entry whose (location, signature) is here without reading its bytes;
    the signature is the entry's kind, size and modification time (or etag on object
    stores). ``batch_id`` is the batch its bytes are: the one it registered (``registered``,
    ``failed``) or, for a ``duplicate``, the earlier batch it repeats. Entries move to the
    archive once their batch is final (``archive_uri``, ``archived_at``) and are deleted
    there after the retention period (``purged_at``).
    """

    __tablename__ = "landing_entries"
    __table_args__ = (
        UniqueConstraint("model_name", "location", "signature"),
        CheckConstraint(_one_of("state", LANDING_ENTRY_STATES), name="state"),
        CheckConstraint(_one_of("kind", LANDING_ENTRY_KINDS), name="kind"),
        Index(None, "model_name", "purged_at", "archived_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200))
    location: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(20))
    size: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(20))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    archive_uri: Mapped[str | None] = mapped_column(Text)
    archived_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]


class DriftReport(Base):
    """One drift test on one feature set of a batch, with the threshold that made the verdict."""

    __tablename__ = "drift_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    feature_set: Mapped[str] = mapped_column(String(100))
    drift_detected: Mapped[bool] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    thresholds: Mapped[dict[str, Any] | None]
    details: Mapped[dict[str, Any] | None]
    html_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IndexRun(Base):
    """The shift indices of one batch against one model's reference stats (one forward pass)."""

    __tablename__ = "index_runs"
    __table_args__ = (Index(None, "model_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    reference_stats_id: Mapped[int | None] = mapped_column(ForeignKey("reference_stats.id"))
    resque_dist: Mapped[float | None] = mapped_column(Float)
    resque_dist_variant: Mapped[str | None] = mapped_column(String(16))
    inv_ari: Mapped[float | None] = mapped_column(Float)
    layer_shift: Mapped[float | None] = mapped_column(Float)
    resque_task: Mapped[float | None] = mapped_column(Float)
    preindex_p: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    mean_loss: Mapped[float | None] = mapped_column(Float)
    mean_entropy: Mapped[float | None] = mapped_column(Float)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    device: Mapped[str | None] = mapped_column(String(50))
    samples: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CostPrediction(Base):
    """Predicted epochs, kWh and kg CO2e (point and interval) for retraining on a batch."""

    __tablename__ = "cost_predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    index_run_id: Mapped[int] = mapped_column(ForeignKey("index_runs.id"), index=True)
    calibration_id: Mapped[int | None] = mapped_column(ForeignKey("calibrations.id"))
    epochs: Mapped[float] = mapped_column(Float)
    epochs_lower: Mapped[float | None] = mapped_column(Float)
    epochs_upper: Mapped[float | None] = mapped_column(Float)
    energy_kwh: Mapped[float] = mapped_column(Float)
    energy_kwh_lower: Mapped[float | None] = mapped_column(Float)
    energy_kwh_upper: Mapped[float | None] = mapped_column(Float)
    emissions_kg: Mapped[float] = mapped_column(Float)
    emissions_kg_lower: Mapped[float | None] = mapped_column(Float)
    emissions_kg_upper: Mapped[float | None] = mapped_column(Float)
    interval_level: Mapped[float | None] = mapped_column(Float)
    predicted_not_to_converge: Mapped[bool] = mapped_column(Boolean, default=False)
    joules_per_sample_epoch: Mapped[float | None] = mapped_column(Float)
    carbon_intensity: Mapped[float | None] = mapped_column(Float)
    samples: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Decision(Base):
    """Retrain, skip or defer one batch, with every reason and the budget state it saw.

    ``blocked_by_budget`` is true when a budget rule is among the reasons the batch was
    not retrained; the audit filters on it. ``model_id`` repeats the batch's model so the
    audit can filter decisions by model without a join through batches.
    """

    __tablename__ = "decisions"
    __table_args__ = (
        CheckConstraint(_one_of("action", DECISION_ACTIONS), name="action"),
        Index(None, "model_id", "created_at"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    cost_prediction_id: Mapped[int | None] = mapped_column(ForeignKey("cost_predictions.id"))
    action: Mapped[str] = mapped_column(String(10))
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    blocked_by_budget: Mapped[bool] = mapped_column(Boolean, default=False)
    budget_state: Mapped[list[Any] | None]
    policy: Mapped[dict[str, Any] | None]
    retry_after: Mapped[datetime | None]
    """A deferral's end: when the budget period that was short ends and the batch is assessed again."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    batch: Mapped[Batch] = relationship()
    cost_prediction: Mapped[CostPrediction | None] = relationship()


class RetrainRun(Base):
    """What one retraining really did and cost, as the retrain executor measured it.

    ``energy_method`` says how the energy was obtained (``measured`` from RAPL/NVML,
    ``estimated`` from TDP and load, or ``priced``: a run killed outright, its last
    heartbeat's work at the host's energy rate), so an audit can tell them apart.
    """

    __tablename__ = "retrain_runs"
    __table_args__ = (
        CheckConstraint(_one_of("status", RETRAIN_STATUSES), name="status"),
        Index(None, "model_id", "started_at"),
        Index(None, "started_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"), index=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    new_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    status: Mapped[str] = mapped_column(String(20), default="running")
    samples: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    epochs: Mapped[float | None] = mapped_column(Float)
    reached_cutoff: Mapped[bool | None] = mapped_column(Boolean)
    initial_accuracy: Mapped[float | None] = mapped_column(Float)
    target_accuracy: Mapped[float | None] = mapped_column(Float)
    final_accuracy: Mapped[float | None] = mapped_column(Float)
    energy_kwh: Mapped[float | None] = mapped_column(Float)
    emissions_kg: Mapped[float | None] = mapped_column(Float)
    cpu_energy_kwh: Mapped[float | None] = mapped_column(Float)
    gpu_energy_kwh: Mapped[float | None] = mapped_column(Float)
    ram_energy_kwh: Mapped[float | None] = mapped_column(Float)
    cpu_power_w: Mapped[float | None] = mapped_column(Float)
    gpu_power_w: Mapped[float | None] = mapped_column(Float)
    ram_power_w: Mapped[float | None] = mapped_column(Float)
    cpu_model: Mapped[str | None] = mapped_column(String(300))
    gpu_model: Mapped[str | None] = mapped_column(String(300))
    country_iso_code: Mapped[str | None] = mapped_column(String(3))
    country_name: Mapped[str | None] = mapped_column(String(100))
    region: Mapped[str | None] = mapped_column(String(100))
    carbon_intensity: Mapped[float | None] = mapped_column(Float)
    energy_method: Mapped[str | None] = mapped_column(String(50))
    grad_norms: Mapped[list[Any] | None]
    param_change: Mapped[float | None] = mapped_column(Float)
    param_change_per_layer: Mapped[dict[str, Any] | None]
    wall_seconds: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    """Renewed by the running process; a ``running`` run whose heartbeat (or, before the
    first, its start) is older than the lease is proven dead (``pipeline.lease``)."""
    progress: Mapped[dict[str, Any] | None]
    """What the running process had done by its latest heartbeat (``pipeline.lease.Progress``):
    a run killed outright is settled at this work's price when it is closed as dead."""


class Calibration(Base):
    """One fitted version of the cost model for an architecture, with its data and error."""

    __tablename__ = "calibrations"
    __table_args__ = (
        UniqueConstraint("architecture", "version"),
        CheckConstraint(_one_of("source", CALIBRATION_SOURCES), name="source"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    architecture: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    source: Mapped[str] = mapped_column(String(10))
    n_points: Mapped[int] = mapped_column(Integer)
    fit_data: Mapped[dict[str, Any]]
    parameters: Mapped[dict[str, Any]]
    loo_error: Mapped[float | None] = mapped_column(Float)
    interval_level: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnergyProbe(Base):
    """Measured energy per training sample-epoch for an architecture on some hardware."""

    __tablename__ = "energy_probes"
    __table_args__ = (
        CheckConstraint("joules_per_sample_epoch >= 0", name="joules_nonnegative"),
        Index(None, "architecture", "hardware", "measured_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    architecture: Mapped[str] = mapped_column(String(200))
    hardware: Mapped[str] = mapped_column(String(300))
    image_size: Mapped[str] = mapped_column(String(50))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    samples: Mapped[int | None] = mapped_column(Integer)
    epochs: Mapped[float | None] = mapped_column(Float)
    energy_kwh: Mapped[float | None] = mapped_column(Float)
    joules_per_sample_epoch: Mapped[float] = mapped_column(Float)
    measurement_method: Mapped[str | None] = mapped_column(String(50))
    details: Mapped[dict[str, Any] | None]
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class Budget(Base):
    """An energy and/or carbon cap over a period, for one model name or all (``scope='*'``).

    A ``NULL`` cap means that measure is not limited; at least one cap is set.
    """

    __tablename__ = "budgets"
    __table_args__ = (
        CheckConstraint(_one_of("period", BUDGET_PERIODS), name="period"),
        CheckConstraint("kwh_cap IS NULL OR kwh_cap >= 0", name="kwh_cap_nonnegative"),
        CheckConstraint("co2_cap IS NULL OR co2_cap >= 0", name="co2_cap_nonnegative"),
        CheckConstraint("kwh_cap IS NOT NULL OR co2_cap IS NOT NULL", name="some_cap"),
        CheckConstraint(
            "(period = 'rolling_days' AND rolling_days >= 1) "
            "OR (period <> 'rolling_days' AND rolling_days IS NULL)",
            name="rolling_days",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    scope: Mapped[str] = mapped_column(String(200), default="*")
    period: Mapped[str] = mapped_column(String(20))
    rolling_days: Mapped[int | None] = mapped_column(Integer)
    kwh_cap: Mapped[float | None] = mapped_column(Float)
    co2_cap: Mapped[float | None] = mapped_column(Float)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]
    """Set when the budget was disabled: it no longer limits decisions; its ledger stays."""


class LedgerEntry(Base):
    """One budget ledger entry: a reservation, or the settle/release that closes one.

    A reservation (``kind='reserve'``) has no ``reservation_id``; a settle or release
    points at the reservation it closes, and the UNIQUE constraint on ``reservation_id``
    lets the database itself refuse a second close. A reservation counts in the period
    of its own ``created_at``: open, it counts its reserved amounts; settled, the measured
    amounts; released, nothing.

    A run that finishes after its reservation was released records a *late settlement*: a
    ``settle`` entry whose ``reservation_id`` points at the ``release`` entry (a release is
    closed at most once too), counted like a settlement of the original reservation.
    """

    __tablename__ = "budget_ledger"
    __table_args__ = (
        CheckConstraint(_one_of("kind", LEDGER_KINDS), name="kind"),
        CheckConstraint("energy_kwh >= 0 AND emissions_kg >= 0", name="amounts_nonnegative"),
        CheckConstraint(
            "(kind = 'reserve' AND reservation_id IS NULL) "
            "OR (kind <> 'reserve' AND reservation_id IS NOT NULL)",
            name="reservation_link",
        ),
        CheckConstraint("NOT priced OR kind = 'settle'", name="priced_settles"),
        Index(None, "budget_id", "kind", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    budget_id: Mapped[int] = mapped_column(ForeignKey("budgets.id"))
    decision_id: Mapped[int] = mapped_column(ForeignKey("decisions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    energy_kwh: Mapped[float] = mapped_column(Float)
    emissions_kg: Mapped[float] = mapped_column(Float)
    reservation_id: Mapped[int | None] = mapped_column(ForeignKey("budget_ledger.id"), unique=True)
    reason: Mapped[str | None] = mapped_column(Text)
    # A settlement at a dead run's work priced by its last heartbeat, not measured: the only
    # settlement a late measure of the same run may replace.
    priced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    budget: Mapped[Budget] = relationship()
