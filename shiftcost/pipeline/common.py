"""What every pipeline step shares: the database, the artifacts location, the cost model store.

A model's cost model lives in the ``calibrations`` table, one row per fitted version, keyed
by the model's architecture and tied to the model version it was fitted for (see
``repository.latest_calibration``): ``fit_data`` holds that version's training rows and
``parameters`` the rest of it (estimator parameters, fitted state, leave-one-out error), so
any version can be rebuilt exactly with :func:`load_cost_model` and every stored prediction
explained later.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from shiftcost.artifacts import Artifacts
from shiftcost.errors import ConfigError
from shiftcost.jsonsafe import json_safe

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shiftcost.config import Settings
    from shiftcost.costmodel import CostModel
    from shiftcost.energy import HostEnergyRate
    from shiftcost.forecast.forecaster import Forecaster
    from shiftcost.store import Database
    from shiftcost.store.models import Calibration

__all__ = [
    "Artifacts",
    "carbon_intensity",
    "connect",
    "json_safe",
    "load_cost_model",
    "least_kwh_left",
    "load_forecaster",
    "store_cost_model",
    "stored_energy_rate",
    "training_samples",
]

@contextmanager
def connect(settings: Settings) -> Iterator[Database]:
    """The settings' database for one step (the process's one engine for its URL).

    The first step of a process opens it: pings the server and checks the schema; later
    steps reuse its engine and pool. An embedded SQLite database is migrated to the newest
    schema on first use in a process (that is what "embedded" promises); any other
    database must already be at head (``shiftcost db upgrade``), else
    ``SchemaVersionError`` says so.
    """
    from shiftcost.store.db import parse_url, shared_database

    url = settings.database_url
    yield shared_database(url, upgrade=parse_url(url).get_backend_name() == "sqlite")


def training_samples(batch_size: int, holdout_fraction: float) -> int:
    """Samples per retraining epoch: the batch minus the held-out split, as the executor splits it."""
    return batch_size - int(round(batch_size * holdout_fraction))


def carbon_intensity(settings: Settings) -> float:
    """kg CO2e per kWh for predictions: the setting, else CodeCarbon's figure for the country."""
    if settings.carbon_intensity_kg_per_kwh is not None:
        return float(settings.carbon_intensity_kg_per_kwh)
    intensity = _grid_intensity(settings.country_iso_code.strip().upper())
    if intensity is None:
        raise ConfigError(
            f"CodeCarbon has no carbon intensity for country code {settings.country_iso_code!r}; set "
            "SHIFTCOST_COUNTRY_ISO_CODE to a 3-letter code such as USA or FRA, or set SHIFTCOST_CARBON_INTENSITY_KG_PER_KWH."
        )
    return intensity


@functools.lru_cache(maxsize=16)
def _grid_intensity(code: str) -> float | None:
    """CodeCarbon's yearly carbon intensity of a country's grid, kg CO2e per kWh (read once per code)."""
    from codecarbon.input import DataSource

    row = DataSource().get_global_energy_mix_data().get(code)
    if row is None or not isinstance(row.get("carbon_intensity"), (int, float)):
        return None
    return float(row["carbon_intensity"]) / 1000.0  # g/kWh in CodeCarbon's table


# ----------------------------------------------------------------------------- cost model store


def store_cost_model(
    session: Session,
    architecture: str,
    cost_model: CostModel,
    *,
    source: str,
    model_id: int | None = None,
    forecaster: Forecaster | None = None,
) -> Calibration:
    """Add the cost model's newest version as the next calibration row of ``architecture``.

    With ``forecaster`` (whose stage 0 is ``cost_model``) its probe stage, energy rate and
    probe settings are kept under ``details["forecaster"]`` (see :func:`load_forecaster`).
    """
    from shiftcost.costmodel import FORMAT
    from shiftcost.store import repository

    version = cost_model.history_.latest
    data = version.to_dict()
    rows = data.pop("rows")
    loo = data.get("loo") or {}
    return repository.add_calibration(
        session,
        architecture,
        source,
        {"rows": json_safe(rows)},
        json_safe({"format": FORMAT, "version": data}),
        n_points=len(rows),
        model_id=model_id,
        loo_error=loo.get("mdape_epochs"),
        interval_level=version.params.get("level"),
        details={
            "cost_model_version": version.version,
            "parent_version": version.parent,
            "features": list(version.features),
            "note": version.note,
            "loo": json_safe(loo),
        }
        | ({} if forecaster is None else {"forecaster": forecaster.probe_stage()}),
    )


def refitted_forecaster(session: Session, architecture: str, cost_model: CostModel, *, model_name: str) -> Forecaster | None:
    """``cost_model``, refitted from model ``model_name``'s newest calibration, with that calibration's
    probe stage, probe settings and calibrated recipe (``None`` where it stored none).

    A refit adds a real retrain to stage 0 only; storing it without the rest would leave every
    later assessment without a probe stage and every guard without the recipe check.
    """
    from shiftcost.forecast.forecaster import Forecaster
    from shiftcost.store import repository

    row = repository.latest_calibration(session, architecture, model_name=model_name)
    saved = None if row is None else (row.details or {}).get("forecaster")
    return None if not saved else Forecaster.with_probe_stage(cost_model, saved)


def load_cost_model(session: Session, architecture: str, *, model_name: str | None) -> tuple[CostModel, Calibration] | None:
    """Model ``model_name``'s newest stored cost model (``architecture`` is its calibration key)
    and its calibration row, if any; ``None`` for the architecture's newest of any model."""
    from shiftcost.costmodel import CostModel
    from shiftcost.store import repository

    row = repository.latest_calibration(session, architecture, model_name=model_name)
    if row is None:
        return None
    version = dict(row.parameters["version"])
    version["rows"] = row.fit_data["rows"]
    payload = {"format": row.parameters["format"], "params": version["params"], "history": [version]}
    return CostModel.from_json(json.dumps(payload)), row


def load_forecaster(
    session: Session, architecture: str, *, model_name: str, image_size: str | None, batch_size: int
) -> Forecaster | None:
    """Model ``model_name``'s newest cost model as a forecaster, with the host's energy rate.

    The energy rate is the newest energy probe of the architecture at ``image_size`` (a
    ``ModelSpec.shape_key``; None: at any size), refitted from real retrains after each one
    (``pipeline.retrain.refit_energy_rate``), read as joules per sample-gradient, so the
    guard prices a run exactly as the assessment priced it. A probe stage (stage 1) is used
    when the calibration row stores one under ``details["forecaster"]`` (what
    ``Forecaster.to_json`` writes for it).
    """
    from shiftcost.forecast.forecaster import Forecaster
    from shiftcost.store import repository

    stored = load_cost_model(session, architecture, model_name=model_name)
    if stored is None:
        return None
    stage0, row = stored
    forecaster = Forecaster.with_probe_stage(stage0, (row.details or {}).get("forecaster") or {}, batch_size=batch_size)
    probe = repository.latest_energy_probe(session, architecture, image_size=image_size)
    if probe is not None:
        forecaster.energy_rate = stored_energy_rate(probe)
    return forecaster


def stored_energy_rate(probe: Any) -> HostEnergyRate:
    """The host's rate an energy probe row holds.

    A rate fitted from measured runs (refitted after a retrain, or registered from a
    calibration) is stored whole under ``details["rate"]``, its per-run overhead with it;
    a probe of training throughput alone is its joules per sample-gradient.
    """
    from shiftcost.energy import HostEnergyRate

    saved = (probe.details or {}).get("rate")
    if saved:
        return HostEnergyRate.from_dict(saved)
    return HostEnergyRate(float(probe.joules_per_sample_epoch), 0.0, 1, probe.hardware)


def check_forecaster(forecaster: Forecaster, settings: Settings, spec: Any) -> None:
    """Refuse a forecaster calibrated on other retrains than the pipeline's (its settings with the model file's recipe)."""
    from shiftcost.recipe import RetrainConfig

    forecaster.check_retrain(
        RetrainConfig.from_settings(settings).for_model(spec),
        "the pipeline (settings retrain_batch_size, retrain_lr, cutoff_tolerance, retrain_holdout_fraction, retrain_max_epochs, retrain_max_steps, and the model file's recipe)",
    )


def least_kwh_left(budget_states: Any) -> float | None:
    """The least kWh left on the budgets (``BudgetStatus.as_dict`` rows); None when none limits kWh."""
    left = [float(b["remaining_kwh"]) for b in budget_states or [] if b.get("remaining_kwh") is not None]
    return min(left) if left else None


