"""Putting a model under the pipeline's care: its first version, reference, cost model, budget.

:func:`bootstrap` does it all at once; the pieces are separate for callers that have some
of them already:

- :func:`register_model_version` saves the weights and the labelled reference data, computes
  the reference stats (the one-off summary every later batch is compared with) and
  registers the version with them, in one transaction;
- :func:`fit_cost_model` fits the initial cost model on calibration runs (rows as
  ``shiftcost.costmodel.CostModel.fit`` takes them, e.g. from a calibration sweep) and
  :func:`store_cost_model` stores a fitted one as the next calibration of its architecture;
- :func:`register_from_files` and :func:`attach_cost_model` are ``shiftcost model register``
  and ``shiftcost model cost-model``: what ``shiftcost calibrate`` wrote, read and checked by
  :func:`read_calibration_files`, becomes a model version's calibration;
- :func:`record_energy_probe` stores joules per training sample-epoch on this hardware, the
  unit that turns predicted epochs into kWh (:func:`measure_energy_probe` measures it);
- :func:`ensure_default_budget` creates the budget the settings describe, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from shiftcost.errors import InputError
from shiftcost.pipeline.common import Artifacts, json_safe, connect, store_cost_model

if TYPE_CHECKING:
    import torch
    from sqlalchemy.orm import Session
    from torch import nn

    from shiftcost.config import Settings
    from shiftcost.costmodel import CostModel
    from shiftcost.data import ModelSpec
    from shiftcost.energy import HostEnergyRate
    from shiftcost.forecast.forecaster import Forecaster
    from shiftcost.retrain import ProbeResult
    from shiftcost.store import Database

__all__ = [
    "Bootstrapped",
    "CalibrationFiles",
    "CostModelAttached",
    "ModelVersion",
    "StoredCalibration",
    "attach_cost_model",
    "bootstrap",
    "ensure_default_budget",
    "fit_cost_model",
    "measure_energy_probe",
    "read_calibration_files",
    "record_energy_probe",
    "register_model_version",
    "store_calibration_files",
    "store_cost_model",
]


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version and its reference."""

    model_id: int
    name: str
    version: int
    weights_uri: str
    fingerprint: str
    reference_stats_id: int
    reference_uri: str
    reference_data_uri: str
    reference_accuracy: float | None
    reference_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Bootstrapped:
    """Everything :func:`bootstrap` registered."""

    model: ModelVersion
    calibration_id: int
    cost_model_version: int
    energy_probe_id: int
    joules_per_sample_epoch: float
    budget: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_model_version(
    db: Database,
    settings: Settings,
    model: nn.Module,
    spec: ModelSpec,
    reference_x: torch.Tensor,
    reference_y: torch.Tensor,
    *,
    name: str | None = None,
    layers: Sequence[str] | None = None,
    parent_id: int | None = None,
) -> ModelVersion:
    """Save ``model`` and its reference data, compute its reference stats, register both.

    ``reference_x`` / ``reference_y`` are labelled data the model serves well (its accuracy
    there, minus the cutoff tolerance, is what retraining aims for). ``layers`` default to
    the classifier's input. Returns the new version (the next number for ``name``).
    """
    from shiftcost.artifacts import bounded_sample, writing
    from shiftcost.data import Batch, model_fingerprint, save_batch, save_model
    from shiftcost.index.engine import compute_reference_stats
    from shiftcost.store import repository

    name = name or settings.model_name
    artifacts = Artifacts.from_settings(settings)
    fingerprint = model_fingerprint(model)
    tag = f"model-{fingerprint[:16]}"
    reference = compute_reference_stats(model, spec, reference_x, reference_y, layers=layers, device=settings.device, seed=settings.retrain_seed)
    weights, data, stats_path = artifacts.model_weights(name, tag), artifacts.reference_data(name, tag), artifacts.reference_stats(name, tag)
    with writing(weights) as path:
        save_model(model, spec, path)
    replay_x, replay_y = bounded_sample(reference_x, reference_y, settings.reference_replay_samples, settings.retrain_seed)
    with writing(data) as path:
        save_batch(Batch(replay_x, replay_y, "reference"), path)
    with writing(stats_path) as path:
        reference.save(path)
    with db.session() as session:
        row = repository.register_model(
            session,
            name,
            spec.architecture,
            weights_uri=str(weights),
            layers=list(reference.layers),
            classes=list(spec.classes),
            parent_id=parent_id,
            fingerprint=fingerprint,
            details={"reference_data_uri": str(data), "spec": spec.to_dict()},
        )
        stats = repository.add_reference_stats(
            session, row.id, str(stats_path), reference.fingerprint, reference.samples,
            accuracy=reference.accuracy, details=json_safe(reference.summary()),
        )  # fmt: skip
        return ModelVersion(
            model_id=row.id,
            name=name,
            version=row.version,
            weights_uri=str(weights),
            fingerprint=fingerprint,
            reference_stats_id=stats.id,
            reference_uri=str(stats_path),
            reference_data_uri=str(data),
            reference_accuracy=reference.accuracy,
            reference_samples=reference.samples,
        )


def fit_cost_model(
    rows: Sequence[Mapping[str, Any]],
    *,
    level: float = 0.9,
    groups: str | None = None,
    features: Sequence[str] | None = None,
) -> CostModel:
    """Fit the initial cost model on calibration runs (see ``CostModel.fit`` for the rows)."""
    from shiftcost.costmodel import CostModel

    return CostModel(level=level, features=features).fit(list(rows), groups=groups, note="calibration")


def record_energy_probe(
    db: Database,
    spec: ModelSpec,
    joules_per_sample_epoch: float,
    *,
    hardware: str,
    probe: ProbeResult | None = None,
    rate: HostEnergyRate | None = None,
) -> int:
    """Store joules per training sample-epoch of ``spec``'s architecture on ``hardware``.

    ``rate``, fitted from measured runs, is stored whole (its per-run overhead with it), so
    the pipeline prices with it exactly as ``shiftcost forecast`` and the guard do.
    """
    with db.session() as session:
        return _add_energy_probe(session, spec, joules_per_sample_epoch, hardware=hardware, probe=probe, rate=rate)


def _add_energy_probe(
    session: Session, spec: ModelSpec, joules_per_sample_epoch: float, *, hardware: str, probe: ProbeResult | None = None,
    rate: HostEnergyRate | None = None,
) -> int:
    from shiftcost.store import repository

    values: dict[str, Any] = {"measurement_method": "given"}
    if rate is not None:
        values = {"measurement_method": "fitted", "details": json_safe({"rate": rate.to_dict()})}
    elif probe is not None:
        values = {
            "batch_size": probe.batch_size,
            "samples": probe.samples,
            "epochs": probe.epochs,
            "energy_kwh": probe.energy.energy_kwh,
            "measurement_method": "measured" if probe.energy.fully_measured else "estimated",
            "details": json_safe(probe.to_dict()),
        }
    row = repository.add_energy_probe(session, spec.architecture, hardware, spec.shape_key, joules_per_sample_epoch, **values)
    return row.id


def measure_energy_probe(settings: Settings, model: nn.Module, spec: ModelSpec) -> ProbeResult:
    """Measure joules per training sample-epoch of ``model`` on this machine (a few seconds)."""
    from shiftcost.retrain import probe_joules_per_sample_epoch

    return probe_joules_per_sample_epoch(
        model, spec, device=settings.device, country_iso_code=settings.country_iso_code,
        batch_size=settings.retrain_batch_size, energy_options={"measure_power_secs": min(settings.energy_sample_s, 0.5)},
    )  # fmt: skip


def ensure_default_budget(db: Database, settings: Settings) -> str | None:
    """Create the budget named by ``budget_name`` from ``budget_kwh`` / ``budget_co2`` unless it exists.

    Returns its name, or None when the settings cap nothing.
    """
    from shiftcost.statuses import BudgetPeriod
    from shiftcost.store import ledger
    from shiftcost.store.errors import NotFoundError

    if settings.budget_kwh is None and settings.budget_co2 is None:
        return None
    with db.session() as session:
        try:
            ledger.get_budget(session, settings.budget_name)
        except NotFoundError:
            ledger.create_budget(
                session,
                settings.budget_name,
                period=settings.budget_period,
                kwh_cap=settings.budget_kwh,
                co2_cap=settings.budget_co2,
                rolling_days=settings.budget_rolling_days if settings.budget_period == BudgetPeriod.ROLLING_DAYS else None,
                description="created from the shiftcost settings",
            )
    return settings.budget_name


def bootstrap(
    settings: Settings,
    model: nn.Module,
    spec: ModelSpec,
    reference_x: torch.Tensor,
    reference_y: torch.Tensor,
    *,
    calibration: CostModel | Forecaster | Sequence[Mapping[str, Any]],
    calibration_groups: str | None = None,
    joules_per_sample_epoch: float | None = None,
    hardware: str | None = None,
    name: str | None = None,
    db: Database | None = None,
) -> Bootstrapped:
    """Register a model's first version, its reference stats, the initial cost model and budget.

    ``calibration`` is a fitted :class:`~shiftcost.costmodel.CostModel`, a
    :class:`~shiftcost.forecast.forecaster.Forecaster` (its probe stage is stored with its
    index model, for the assessment's probe and the retrain guard) or the calibration runs
    to fit one on (grouped by the row key ``calibration_groups``, e.g. "corruption").
    ``joules_per_sample_epoch`` defaults to the median over calibration runs that carry
    energy, else to a short probe on this machine. ``db`` defaults to the settings' database.
    """
    if db is None:
        with connect(settings) as database:
            return bootstrap(
                settings, model, spec, reference_x, reference_y, calibration=calibration, calibration_groups=calibration_groups,
                joules_per_sample_epoch=joules_per_sample_epoch, hardware=hardware, name=name, db=database,
            )  # fmt: skip
    from shiftcost.costmodel import CostModel, estimate_joules_per_sample_epoch
    from shiftcost.store import repository
    from shiftcost.store.errors import NotFoundError

    name = name or settings.model_name
    with db.session(readonly=True) as session:
        try:
            existing = repository.get_model(session, name)
        except NotFoundError:
            existing = None
    if existing is not None:
        raise InputError(f"Model {name} is registered already (version {existing.version}); use another name or a fresh database.")

    from shiftcost.forecast.forecaster import Forecaster

    forecaster = calibration if isinstance(calibration, Forecaster) else None
    if forecaster is not None:
        calibration = forecaster.stage0
    if isinstance(calibration, CostModel):
        cost_model = calibration
    else:
        cost_model = fit_cost_model(calibration, level=settings.interval_level, groups=calibration_groups)
    probe = None
    if joules_per_sample_epoch is None and not isinstance(calibration, CostModel):
        try:
            joules_per_sample_epoch = estimate_joules_per_sample_epoch(calibration)
            hardware = hardware or "estimated from the calibration runs"
        except InputError:
            pass
    if joules_per_sample_epoch is None:
        probe = measure_energy_probe(settings, model, spec)
        joules_per_sample_epoch, hardware = probe.joules_per_sample_epoch, probe.hardware

    version = register_model_version(db, settings, model, spec, reference_x, reference_y, name=name)
    with db.session() as session:
        calibration_row = store_cost_model(session, spec.architecture, cost_model, source="sweep", model_id=version.model_id, forecaster=forecaster)
        calibration_id = calibration_row.id
    probe_id = record_energy_probe(db, spec, joules_per_sample_epoch, hardware=hardware or "unknown", probe=probe)
    budget = ensure_default_budget(db, settings)
    return Bootstrapped(version, calibration_id, cost_model.version_, probe_id, float(joules_per_sample_epoch), budget)


@dataclass(frozen=True)
class Registered:
    """What :func:`register_from_files` stored."""

    model: ModelVersion
    parent_version: int | None
    accuracy: dict[str, Any]
    calibration_id: int | None
    cost_model_version: int | None
    energy_probe_id: int | None
    joules_per_sample_epoch: float | None
    budget: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_from_files(
    settings: Settings,
    model_path: str,
    reference_path: str,
    *,
    name: str | None = None,
    cost_model_path: str | None = None,
    joules_per_sample_epoch: float | None = None,
    db: Database | None = None,
) -> Registered:
    """``shiftcost model register``: a model file and its labelled reference data become
    the model's next version (the current one when it is the first, or the parent's
    successor), with its reference stats and, given ``cost_model_path`` (``costmodel.json``
    from ``shiftcost calibrate``), its cost model and energy unit.

    Everything is checked before anything is written: the accuracy on the reference data
    (near chance refused), the cost model file, and that the sweep behind it used the
    model's own recipe.
    """
    if db is None:
        with connect(settings) as database:
            return register_from_files(
                settings, model_path, reference_path, name=name, cost_model_path=cost_model_path,
                joules_per_sample_epoch=joules_per_sample_epoch, db=database,
            )  # fmt: skip
    from shiftcost.data import check_batch, load_batch, load_model
    from shiftcost.data.importing import check_accuracy, refuse_near_chance
    from shiftcost.store import repository
    from shiftcost.store.errors import NotFoundError

    name = name or settings.model_name
    model, spec = load_model(model_path)
    reference = load_batch(reference_path, spec=spec)
    check_batch(reference, spec)
    if reference.y is None:
        raise InputError(f"Reference data {reference_path} has no labels; the reference needs a label per image.")
    accuracy = check_accuracy(model, spec, reference, device="cpu")
    refuse_near_chance(accuracy)
    calibration = None if cost_model_path is None else read_calibration_files(cost_model_path, spec, joules_per_sample_epoch)
    with db.session(readonly=True) as session:
        try:
            parent = repository.get_model(session, name)
        except NotFoundError:
            parent = None
        parent_id, parent_version = (None, None) if parent is None else (parent.id, parent.version)

    version = register_model_version(db, settings, model, spec, reference.x, reference.y, name=name, parent_id=parent_id)
    stored = probe_id = None
    with db.session() as session:
        if calibration is not None:
            stored = store_calibration_files(session, spec, version.model_id, calibration)
        elif joules_per_sample_epoch is not None:
            probe_id = _add_energy_probe(session, spec, joules_per_sample_epoch, hardware="given with --joules-per-sample-epoch")
    budget = ensure_default_budget(db, settings)
    if stored is None:
        return Registered(version, parent_version, accuracy.to_dict(), None, None, probe_id, joules_per_sample_epoch, budget)
    return Registered(
        version, parent_version, accuracy.to_dict(), stored.calibration_id, stored.cost_model_version, stored.energy_probe_id,
        calibration.joules, budget,
    )  # fmt: skip


@dataclass(frozen=True)
class CalibrationFiles:
    """What ``shiftcost calibrate --out DIR`` wrote, read and checked against a model's spec."""

    cost_model: CostModel
    forecaster: Forecaster | None
    label_free: CostModel | None
    joules: float | None
    # The rate fitted on the calibration's measured retrains prices a run as the forecast does, overhead included.
    rate: HostEnergyRate | None


@dataclass(frozen=True)
class StoredCalibration:
    calibration_id: int
    calibration_version: int
    cost_model_version: int
    energy_probe_id: int | None


def read_calibration_files(path_text: str, spec: ModelSpec, joules_per_sample_epoch: float | None = None) -> CalibrationFiles:
    """``costmodel.json`` (or its folder) and what calibrate wrote beside it; ``joules_per_sample_epoch``,
    when given, replaces the sweep's energy unit. Refused in one sentence where it does not fit ``spec``."""
    cost_model, joules_from_sweep, label_free = _read_calibration(path_text, spec)
    forecaster = _forecaster_beside(path_text, cost_model)
    rate = None if joules_per_sample_epoch is not None or forecaster is None else forecaster.energy_rate
    joules = joules_per_sample_epoch if joules_per_sample_epoch is not None else joules_from_sweep
    if rate is not None:
        joules = rate.joules_per_sample
    return CalibrationFiles(cost_model, forecaster, label_free, joules, rate)


def store_calibration_files(session: Session, spec: ModelSpec, model_id: int, files: CalibrationFiles) -> StoredCalibration:
    """The cost model (its probe stage with it), the label-free one and the energy unit, as the
    calibration of model version ``model_id``, in the caller's transaction."""
    from shiftcost.pipeline.labels import label_free_key

    row = store_cost_model(session, spec.architecture, files.cost_model, source="sweep", model_id=model_id, forecaster=files.forecaster)
    if files.label_free is not None:
        store_cost_model(session, label_free_key(spec.architecture), files.label_free, source="sweep", model_id=model_id)
    probe_id = None
    if files.joules is not None:
        hardware = (files.rate and files.rate.hardware) or "measured by the calibration sweep"
        probe_id = _add_energy_probe(session, spec, files.joules, hardware=hardware, rate=files.rate)
    return StoredCalibration(row.id, row.version, files.cost_model.version_, probe_id)


@dataclass(frozen=True)
class CostModelAttached:
    """What :func:`attach_cost_model` stored, and the calibration it replaces."""

    name: str
    version: int
    architecture: str
    calibration: StoredCalibration
    joules_per_sample_epoch: float | None
    replaced_calibration_version: int | None


def attach_cost_model(
    settings: Settings,
    cost_model_path: str,
    *,
    name: str | None = None,
    joules_per_sample_epoch: float | None = None,
    db: Database | None = None,
) -> CostModelAttached:
    """``shiftcost model cost-model``: a new sweep's ``costmodel.json`` (after new hardware, with
    more points) becomes the calibration the model's current version forecasts with.

    Checked against that version's spec first (another architecture or recipe is refused,
    nothing written); earlier calibrations stay, so past decisions still name theirs.
    """
    if db is None:
        with connect(settings) as database:
            return attach_cost_model(settings, cost_model_path, name=name, joules_per_sample_epoch=joules_per_sample_epoch, db=database)
    from shiftcost.data import ModelSpec
    from shiftcost.store import repository
    from shiftcost.store.errors import NotFoundError

    name = name or settings.model_name
    with db.session() as session:
        try:
            current = repository.get_model(session, name)
        except NotFoundError:
            raise InputError(
                f"No model named {name} is registered; register it first with "
                f"`shiftcost model register -m MODEL_FILE -r REFERENCE_DATA --cost-model {cost_model_path}`."
            ) from None
        saved_spec = (current.details or {}).get("spec")
        if saved_spec is None:
            raise InputError(f"Model {name} version {current.version} was registered without its spec; register the model file again with `shiftcost model register`.")
        spec = ModelSpec.from_dict(saved_spec, source=f"model {name} version {current.version}")
        files = read_calibration_files(cost_model_path, spec, joules_per_sample_epoch)
        replaced = repository.latest_calibration(session, spec.architecture, model_name=name)
        stored = store_calibration_files(session, spec, current.id, files)
        return CostModelAttached(name, current.version, spec.architecture, stored, files.joules, None if replaced is None else replaced.version)


def _forecaster_beside(path_text: str, cost_model: CostModel) -> Forecaster | None:
    """The probe stage in the ``forecaster.json`` that calibrate writes beside ``costmodel.json``, if any."""
    from shiftcost.forecast.forecaster import Forecaster

    saved = Forecaster.beside(path_text)
    if saved is not None:
        saved.stage0 = cost_model  # the index stage is the cost model being registered
    return saved


def _read_calibration(path_text: str, spec: ModelSpec) -> tuple[CostModel, float | None, CostModel | None]:
    """The cost model in ``costmodel.json``, the sweep's joules per sample-epoch and the
    label-free cost model beside it (when the sweep could fit one).

    Refuses a sweep run with another recipe than the model's: its forecasts would be of
    retrains that never happen.
    """
    import json
    from pathlib import Path

    from shiftcost.calibrate import LABEL_FREE_FILE
    from shiftcost.costmodel import CostModel
    from shiftcost.forecast.forecaster import check_calibrated_model
    from shiftcost.recipe import RetrainConfig

    path = Path(path_text)
    if path.is_dir():
        path = path / "costmodel.json"
    if not path.is_file():
        raise InputError(f"Cost model file {path} does not exist; give the costmodel.json that `shiftcost calibrate` wrote.")
    try:
        cost_model = CostModel.from_json(path.read_text(encoding="utf-8"))
    except InputError as error:
        raise InputError(f"Cost model file {path}: {error}") from None
    label_free = None
    label_free_file = path.with_name(LABEL_FREE_FILE)
    if label_free_file.is_file():
        try:
            label_free = CostModel.from_json(label_free_file.read_text(encoding="utf-8"))
        except InputError as error:
            raise InputError(f"Cost model file {label_free_file}: {error}") from None
    sweep_file = path.with_name("sweep.json")
    if not sweep_file.is_file():
        return cost_model, None, label_free
    try:
        sweep = json.loads(sweep_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise InputError(f"{sweep_file} beside the cost model is not valid JSON; run `shiftcost calibrate` again.") from None
    settings = sweep.get("settings") or {}
    check_calibrated_model(settings.get("architecture"), settings.get("input_shape"), spec, f"The cost model in {path}", "this model file")
    swept = (settings.get("retrain") or {}).get("recipe")
    if swept is not None:
        expected = RetrainConfig().for_model(spec).to_dict()["recipe"]
        differing = sorted(key for key in expected if key in swept and swept[key] != expected[key])
        if differing:
            raise InputError(
                f"The cost model in {path} was calibrated with another recipe than the model's ({', '.join(differing)} differ); "
                "run `shiftcost calibrate` on this model file again."
            )
    joules = sweep.get("joules_per_sample_epoch") or {}
    value = joules.get("sweep") or joules.get("probe")
    return cost_model, None if value is None else float(value), label_free
