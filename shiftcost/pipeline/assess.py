"""Assessment of one batch: load, one forward pass, drift, cost, decision, storage.

The steps, each a function a Prefect task can wrap:

1. :func:`load_for_assessment` reads the current model version, its reference stats and
   the batch, and validates the batch against the model;
2. :func:`index_pass` makes the single forward pass (``shiftcost.index.engine.assess``):
   indices, embedding sample, image statistics and predicted classes;
3. :func:`check_drift` runs the Evidently drift tests on those outputs of the same pass
   and writes Evidently's HTML report;
4. :func:`estimate_cost` predicts epochs, kWh and kg CO2e (skipped without drift unless
   ``always_assess``): the index model first, then, when it pays
   (``shiftcost.forecast.decide.probe_pays``: the index interval straddles what the
   budgets have left and the probe costs at most ``probe_max_share`` of it; never where calibration's batches were
   forecast no better with a probe), a probe of a few fine-tuning steps
   whose learning curve gives the forecast the decision uses; the probe's cost is charged
   to the budgets like any other spend;
5. :func:`store_assessment` decides under the budgets and stores everything in one
   transaction: drift reports, index run, cost prediction, decision, budget reservation
   and the batch's new status, or nothing at all.

:func:`shiftcost.pipeline.chain.assess` chains them for a claimed batch; a user-caused
problem (unreadable batch, wrong image size, too few images) marks the batch failed with
its reason, any other failure gives the claim back so that a retry processes the batch.
The decision itself (the policy plus what only the pipeline knows) is
:mod:`shiftcost.pipeline.decide`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shiftcost import landing
from shiftcost.errors import ConfigError, InputError
from shiftcost.features import KNOWN_FEATURES
from shiftcost.forecast.price import RetrainPrice
from shiftcost.pipeline.assess_record import AssessOutcome, fail_assessment, outcome_of
from shiftcost.pipeline.claims import Claim, ClaimLost
from shiftcost.pipeline.decide import decide_batch, status_after
from shiftcost.pipeline.labels import label_free_key, with_labels
from shiftcost.pipeline.common import (
    Artifacts,
    carbon_intensity,
    check_forecaster,
    json_safe,
    least_kwh_left,
    load_cost_model,
    stored_energy_rate,
    training_samples,
)

if TYPE_CHECKING:
    from torch import nn

    from shiftcost.config import Settings
    from shiftcost.costmodel import CostPrediction
    from shiftcost.data import Batch, ModelSpec
    from shiftcost.drift import DriftResult
    from shiftcost.energy import HostEnergyRate
    from shiftcost.index.engine import IndexReport
    from shiftcost.index.reference import ReferenceStats
    from shiftcost.store import Database

__all__ = [
    "REPORT_FEATURES",
    "AssessOutcome",
    "CostEstimate",
    "DriftCheck",
    "LoadedBatch",
    "align_labels",
    "check_drift",
    "estimate_cost",
    "fail_assessment",
    "index_pass",
    "load_for_assessment",
    "load_model_and_reference",
    "outcome_of",
    "report_features",
    "store_assessment",
]

#: Features of the cost model that the index report can supply.
REPORT_FEATURES = KNOWN_FEATURES


# ----------------------------------------------------------------------------- results


@dataclass
class LoadedBatch:
    """A claimed batch with everything its assessment needs, in memory."""

    claim: Claim
    source_uri: str
    fingerprint: str
    model_id: int
    model_name: str
    model_version: int
    model: nn.Module
    spec: ModelSpec
    reference: ReferenceStats
    reference_stats_id: int
    data: Batch
    new_task: bool
    """The labels include classes the model has no output for (a task change)."""
    unknown_labels: list[Any] = field(default_factory=list)

    @property
    def batch_id(self) -> int:
        return self.claim.batch_id


@dataclass(frozen=True)
class DriftCheck:
    """The drift result of a batch and where its Evidently report was written."""

    result: DriftResult
    html_path: str

    @property
    def verdict(self) -> bool:
        return self.result.verdict


@dataclass(frozen=True)
class CostEstimate:
    """The predicted cost of retraining on a batch, or why it could not be predicted."""

    prediction: CostPrediction | None
    problem: str | None
    features: dict[str, float]
    samples: int
    joules_per_sample_epoch: float
    carbon_intensity: float
    calibration_id: int
    cost_model_version: int
    energy_probe_id: int
    stage: str = "index"
    """``index`` (the index model alone) or ``probe`` (the probe's learning curve as well)."""
    probe_advice: str | None = None
    """Why a probe was run or not, in one sentence."""
    probe: dict[str, Any] | None = None
    """The probe's trajectory, cost (steps, samples, seconds, kWh), features and index-stage prediction."""

    @property
    def probe_spend(self) -> tuple[float, float] | None:
        """(kWh, kg CO2e) the probe spent, to charge to the budgets; None without a probe."""
        if self.probe is None or self.probe["cost"].get("energy_kwh") is None:
            return None
        kwh = float(self.probe["cost"]["energy_kwh"])
        return kwh, kwh * self.carbon_intensity


# ----------------------------------------------------------------------------- 1. load


def load_for_assessment(db: Database, settings: Settings, claim: Claim) -> LoadedBatch:
    """Read the newest model version, its reference stats and the batch; validate the batch.

    A batch the model cannot take raises ``InputError``; a missing model file or
    reference stats raise ``ConfigError`` (the batch is not at fault).
    """
    from shiftcost.data import check_batch, load_batch
    from shiftcost.store import repository

    with db.session(readonly=True) as session:
        row = repository.get_batch(session, claim.batch_id)
        source_uri, fingerprint, model_name, labels_uri = row.source_uri, row.fingerprint, row.model_name, row.labels_uri
        model_row = repository.get_model(session, model_name)
        stats_row = repository.latest_reference_stats(session, model_row.id)
        model_id, version, weights = model_row.id, model_row.version, model_row.weights_uri
    if stats_row is None or not weights:
        raise ConfigError(
            f"Model {model_name} version {version} has no weights file or reference stats registered; "
            "register it with shiftcost.pipeline.bootstrap."
        )
    model, spec, reference = load_model_and_reference(model_name, version, weights, stats_row.uri)
    with landing.local_copy(source_uri) as path:
        data = load_batch(path, spec=spec)
    data.source = source_uri
    data = with_labels(data, labels_uri, fingerprint)
    data, new_task, unknown = align_labels(data, spec)
    check_batch(dataclasses.replace(data, y=None) if new_task else data, spec)
    return LoadedBatch(
        claim=claim,
        source_uri=source_uri,
        fingerprint=fingerprint,
        model_id=model_id,
        model_name=model_name,
        model_version=version,
        model=model,
        spec=spec,
        reference=reference,
        reference_stats_id=stats_row.id,
        data=data,
        new_task=new_task,
        unknown_labels=unknown,
    )


def load_model_and_reference(name: str, version: int, weights: str, stats_uri: str) -> tuple[Any, Any, Any]:
    from shiftcost.artifacts import reading
    from shiftcost.data import load_model
    from shiftcost.index.reference import ReferenceStats

    try:
        with reading(weights) as weights_path, reading(stats_uri) as stats_path:
            model, spec = load_model(weights_path)
            reference = ReferenceStats.load(stats_path, model=model)
    except InputError as error:
        raise ConfigError(f"Model {name} version {version} cannot be used: {error}") from None
    return model, spec, reference


def align_labels(data: Batch, spec: ModelSpec) -> tuple[Batch, bool, list[Any]]:
    """Map named labels to the model's label ids; detect labels the model has no output for."""
    if data.y is None:
        return data, False, []
    if data.classes is not None:
        unknown = data.unknown_classes(spec)
        if unknown:
            return data, True, unknown
        return data.with_model_ids(spec), False, []
    unknown_ids = sorted(int(label) for label in data.y.unique() if int(label) >= spec.num_classes)
    return data, bool(unknown_ids), unknown_ids


# ----------------------------------------------------------------------------- 2. forward pass


def index_pass(settings: Settings, loaded: LoadedBatch) -> IndexReport:
    """The one forward pass over the batch: every index and the drift inputs."""
    from shiftcost.index.engine import assess

    data = loaded.data
    return assess(
        loaded.model,
        loaded.spec,
        loaded.reference,
        data.x,
        data.y,
        task=loaded.new_task,
        device=settings.device,
        check_model=False,  # checked when the reference stats were loaded for this model
    )


# ----------------------------------------------------------------------------- 3. drift


def check_drift(settings: Settings, loaded: LoadedBatch, report: IndexReport) -> DriftCheck:
    """Evidently drift tests on the embeddings, image statistics and predictions of the pass."""
    from shiftcost.drift import DriftThresholds, detect_drift

    thresholds = DriftThresholds(
        embeddings=settings.drift_embeddings_threshold,
        image_stats=settings.drift_image_stats_threshold,
        image_stats_share=settings.drift_image_stats_share,
        predictions=settings.drift_predictions_threshold,
        min_drifted_groups=settings.drift_min_groups,
    )
    try:
        result = detect_drift(
            _reference_inputs(loaded.reference),
            _batch_inputs(report),
            embedding_method=settings.drift_embedding_method,
            thresholds=thresholds,
            max_embedding_rows=settings.drift_max_rows,
            seed=settings.retrain_seed,
        )
    except InputError as error:  # e.g. too few images: say which batch
        raise InputError(f"Batch {loaded.source_uri} cannot be tested for drift: {error}") from None
    from shiftcost.artifacts import writing

    report_url = Artifacts.from_settings(settings).drift_report(loaded.batch_id, loaded.fingerprint)
    try:
        with writing(report_url) as path:
            result.save_html(path)
    except OSError as error:
        raise ConfigError(
            f"Cannot write the drift report {report_url} ({error.strerror or error}); make SHIFTCOST_ARTIFACTS_DIR "
            "writable and give it free space."
        ) from None
    return DriftCheck(result, report_url)


def _reference_inputs(reference: ReferenceStats) -> Any:
    from shiftcost.drift import DriftInputs

    images = reference.image_stats_sample.compute().features
    counts = reference.predictions.compute()["predicted_counts"]
    return DriftInputs(
        embeddings=reference.embedding_sample.compute().features,
        image_stats=_columns(images, reference.image_stat_names),
        predictions=_expand_counts(counts),
    )


def _batch_inputs(report: IndexReport) -> Any:
    from shiftcost.drift import DriftInputs

    assert report.embedding_sample is not None and report.image_stats is not None
    return DriftInputs(
        embeddings=report.embedding_sample[0],
        image_stats=_columns(report.image_stats, report.image_stat_names),
        predictions=_expand_counts(report.predicted_counts),
    )


def _columns(table: Any, names: tuple[str, ...]) -> dict[str, Any]:
    values = table.detach().cpu().numpy()
    return {name: values[:, i] for i, name in enumerate(names)}


def _expand_counts(counts: list[int]) -> Any:
    """One predicted class per image from per-class counts (what a categorical test sees)."""
    import numpy as np

    return np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))


# ----------------------------------------------------------------------------- 4. cost


def report_features(report: IndexReport) -> dict[str, float]:
    """The index report's values under the cost model's feature names (missing ones left out)."""
    values = {name: getattr(report, name) for name in REPORT_FEATURES}
    return {name: float(value) for name, value in values.items() if value is not None and math.isfinite(value)}


def retrain_pool_samples(settings: Settings, loaded: LoadedBatch) -> int:
    """Samples per epoch of the retrain the forecast is for: the batch's training split plus
    the reference data the model's recipe replays."""
    from shiftcost.recipe import RetrainConfig, pool_samples

    replay = RetrainConfig.from_settings(settings).for_model(loaded.spec).recipe.replay_with(True)
    return pool_samples(training_samples(len(loaded.data), settings.retrain_holdout_fraction), replay, loaded.reference.samples)


def retrain_price(settings: Settings, loaded: LoadedBatch, rate: HostEnergyRate) -> RetrainPrice:
    """How this batch's retrain is priced: its pool, holdout, batch size and epoch cap."""
    from shiftcost.forecast.protocol import split_sizes
    from shiftcost.recipe import RetrainConfig

    _, holdout = split_sizes(len(loaded.data), settings.retrain_holdout_fraction)
    batch_size = RetrainConfig.from_settings(settings).for_model(loaded.spec).recipe.batch_size
    return RetrainPrice(retrain_pool_samples(settings, loaded), holdout, batch_size, rate, settings.retrain_max_epochs)


def estimate_cost(db: Database, settings: Settings, loaded: LoadedBatch, report: IndexReport, drift: DriftCheck) -> CostEstimate | None:
    """Predicted epochs, kWh and kg CO2e of retraining on the batch.

    None when no drift was detected and ``always_assess`` is off: a batch that did not
    move costs nothing to assess. A batch whose indices the cost model cannot use (a
    feature it was fitted on is missing) gives an estimate with ``problem`` set.
    """
    from shiftcost.forecast.forecaster import Interval
    from shiftcost.store import repository

    if not drift.verdict and not settings.always_assess:
        return None
    architecture = loaded.spec.architecture
    with db.session(readonly=True) as session:
        stored = None
        if not loaded.data.has_labels:
            # Forecast from label-free features only, when such a model was calibrated.
            stored = load_cost_model(session, label_free_key(architecture), model_name=loaded.model_name)
        stored = stored or load_cost_model(session, architecture, model_name=loaded.model_name)
        probe = repository.latest_energy_probe(session, architecture, image_size=loaded.spec.shape_key)
        probe_values = None if probe is None else (probe.id, stored_energy_rate(probe))
        forecaster = None
        budget_left = None
        if stored is not None:
            from shiftcost.forecast.forecaster import Forecaster
            from shiftcost.recipe import RetrainConfig

            # The probe stage stored beside this cost model (prices come from the energy probe row). Built
            # for every batch, labelled or not: it refuses a cost model calibrated on other retrains.
            saved = (stored[1].details or {}).get("forecaster") or {}
            forecaster = Forecaster.with_probe_stage(
                stored[0], saved, batch_size=RetrainConfig.from_settings(settings).for_model(loaded.spec).recipe.batch_size
            )
            check_forecaster(forecaster, settings, loaded.spec)
        if loaded.data.has_labels and stored is not None:
            from shiftcost.store import ledger

            budget_left = least_kwh_left([b.as_dict() for b in ledger.budget_status(session, loaded.model_name)])
    if stored is None:
        raise ConfigError(
            f"No cost model is calibrated for model {loaded.model_name} ({architecture}); "
            "give it the costmodel.json of `shiftcost calibrate` with `shiftcost model cost-model`."
        )
    if probe_values is None:
        raise ConfigError(
            f"No energy rate is recorded for {architecture} at {loaded.spec.shape_key} inputs, so epochs cannot be turned into kWh; "
            "give the model its calibration with `shiftcost model cost-model DIR` (or `--joules-per-sample-epoch J`, as `shiftcost probe-energy` measures it)."
        )
    cost_model, calibration = stored
    probe_id, rate = probe_values
    features = report_features(report)
    samples = retrain_pool_samples(settings, loaded)
    intensity = carbon_intensity(settings)
    prediction, problem = None, None
    assert forecaster is not None  # built with the cost model
    price = retrain_price(settings, loaded, rate)
    try:
        (prediction,) = cost_model.predict_costs([features])
        # Held at the horizon as the forecaster holds its forecasts, then priced.
        epochs = forecaster.within_horizon(Interval(prediction.epochs, prediction.epochs_lower, prediction.epochs_upper, prediction.level))
        prediction = price.priced(prediction, (epochs.median, epochs.low, epochs.high), intensity)
    except InputError as error:
        problem = str(error)
    stage, advice, probe_record = "index", None, None
    if not loaded.data.has_labels:
        advice = "the batch has no labels, and a probe trains on them"
    elif prediction is not None and forecaster is not None:
        prediction, stage, advice, probe_record = probe_if_it_pays(
            settings, loaded, features, prediction, forecaster, budget_left, price, intensity
        )
    return CostEstimate(
        prediction=prediction,
        problem=problem,
        features=features,
        samples=samples,
        joules_per_sample_epoch=rate.joules_per_sample,
        carbon_intensity=intensity,
        calibration_id=calibration.id,
        cost_model_version=cost_model.version_,
        energy_probe_id=probe_id,
        stage=stage,
        probe_advice=advice,
        probe=probe_record,
    )


def probe_if_it_pays(
    settings: Settings,
    loaded: LoadedBatch,
    features: dict[str, float],
    prediction: CostPrediction,
    forecaster: Any,
    budget_left_kwh: float | None,
    price: RetrainPrice,
    intensity: float,
) -> tuple[CostPrediction, str, str, dict[str, Any] | None]:
    """Run the probe when it can change the decision and is cheap; the prediction to decide on.

    Returns ``(prediction, stage, advice, probe)``: the index prediction (stage ``index``)
    or the probe-stage one (stage ``probe``), why, and what the probe saw and spent. The
    probe-stage epochs are priced like the index model's (``price``), so the two stages are
    comparable; the probe's own energy is measured with CodeCarbon,
    as retrains are, and estimated from the same joules per sample (evaluations weighted
    as the protocol weighs them) beside it; the estimate stands in when nothing is measured.
    """
    from shiftcost.forecast import probe as probing
    from shiftcost.forecast.decide import probe_pays
    from shiftcost.forecast.forecaster import Interval
    from shiftcost.recipe import RetrainConfig

    reference_accuracy = loaded.reference.accuracy
    unprobeable = _why_no_probe(loaded, prediction, forecaster, budget_left_kwh)
    if unprobeable is not None or reference_accuracy is None or budget_left_kwh is None:
        return prediction, "index", unprobeable or "", None
    chosen = forecaster.probe_options()
    probe_kwh = price.probe_kwh(chosen)
    index_kwh = Interval(prediction.energy_kwh, prediction.energy_kwh_lower or 0.0, prediction.energy_kwh_upper or math.inf, prediction.level)
    advice = probe_pays(index_kwh, budget_left_kwh, probe_kwh, settings.probe_max_share)
    if not advice.probe:
        return prediction, "index", advice.reason, None
    # Measured like the retrain it stands in for; the estimate stays beside it in the record.
    metering = RetrainConfig.from_settings(settings).energy
    try:
        trajectory = probing.run_probe(
            loaded.model,
            loaded.data.x,
            loaded.data.y,
            target_accuracy=reference_accuracy - settings.cutoff_tolerance,
            ceiling=reference_accuracy,
            holdout_fraction=settings.retrain_holdout_fraction,
            seed=settings.retrain_seed,
            device=settings.device,
            energy_rate=price.rate,
            source=f"batch {loaded.source_uri}",
            retrain_batch_size=forecaster.batch_size,
            track_energy=metering.track,
            country_iso_code=metering.country_iso_code,
            energy_options=dict(metering.options),
            **chosen,
        )
    except (InputError, ConfigError) as error:
        # The index forecast still stands; the batch is not at fault for a probe that cannot run.
        return prediction, "index", f"the probe could not run ({error})", None
    forecast = forecaster.predict(features, probe=trajectory)
    record = trajectory.to_dict() | {"features": forecast.features, "index_prediction": prediction.to_dict()}
    return _probe_stage(prediction, forecast, price, intensity), "probe", advice.reason, record


def _why_no_probe(loaded: LoadedBatch, prediction: CostPrediction, forecaster: Any, budget_left_kwh: float | None) -> str | None:
    """Why no probe can change this decision, or None when one could."""
    if budget_left_kwh is None:
        return "no budget limits kWh, so a probe cannot change the decision"
    not_worth = forecaster.probe_not_worth()
    if not_worth:
        return not_worth
    if loaded.reference.accuracy is None or prediction.energy_kwh is None:
        return "the model's reference accuracy or the energy of the forecast is unknown"
    if loaded.new_task:
        return "the batch has classes the model has no output for, so there is nothing to probe"
    return None


def _probe_stage(prediction: CostPrediction, forecast: Any, price: RetrainPrice, intensity: float) -> CostPrediction:
    """The index prediction with the probe stage's epochs, priced as the index stage's are."""
    epochs = forecast.epochs
    return dataclasses.replace(
        price.priced(prediction, (epochs.median, epochs.low, epochs.high), intensity),
        predicted_not_to_converge=forecast.not_converging,
        p_not_converge=forecast.p_not_converge,
        features=forecast.features,
        extrapolated=forecast.extrapolated,
    )


# ----------------------------------------------------------------------------- 5. decide and store


def store_assessment(
    db: Database,
    settings: Settings,
    loaded: LoadedBatch,
    report: IndexReport,
    drift: DriftCheck,
    estimate: CostEstimate | None,
) -> AssessOutcome:
    """Decide under the budgets and store the whole assessment in one transaction.

    The applicable budgets are locked first, so the budget state the decision sees is the
    one its reservation is checked against. If the claim on the batch was lost (another
    run took over), nothing is written and the outcome says so.
    """
    from shiftcost.store import assessments

    try:
        with db.session() as session:
            budgets = assessments.lock_budgets(session, loaded.model_name)
            decision = decide_batch(settings, loaded, report, drift, estimate, budgets)
            status = status_after(decision)
            batch_values = {"status": status, "model_id": loaded.model_id, "samples": len(loaded.data), "has_labels": loaded.data.has_labels}
            decision_id = assessments.record_assessment(
                session, loaded.claim, batch_values=batch_values, drift=drift.result, drift_html=str(drift.html_path),
                index_run=_index_run_values(loaded, report), estimate=estimate, decision=decision, budgets=budgets,
            )  # fmt: skip
    except ClaimLost:
        return outcome_of(db, loaded.batch_id)
    return AssessOutcome(
        batch_id=loaded.batch_id,
        status=status,
        processed=True,
        source_uri=loaded.source_uri,
        fingerprint=loaded.fingerprint,
        action=decision.action,
        decision_id=decision_id,
        summary=decision.summary(),
        reasons=[reason.to_dict() for reason in decision.reasons],
        drift=drift.verdict,
        drift_report=str(drift.html_path),
        indices=report.to_dict(),
        prediction=None if estimate is None or estimate.prediction is None else estimate.prediction.to_dict(),
        forecast_stage=None if estimate is None or estimate.prediction is None else estimate.stage,
        probe_advice=None if estimate is None else estimate.probe_advice or None,
        probe_cost=None if estimate is None or estimate.probe is None else estimate.probe["cost"],
        model_version=loaded.model_version,
    )


def _index_run_values(loaded: LoadedBatch, report: IndexReport) -> dict[str, Any]:
    """The index run row of the pass (``repository.add_index_run``'s arguments after the batch)."""
    return {
        "model_id": loaded.model_id,
        "samples": report.samples,
        "reference_stats_id": loaded.reference_stats_id,
        "device": report.device,
        "seconds": report.seconds,
        "resque_dist_variant": report.resque_dist_variant,
        "details": json_safe(report.to_dict()),
        **{name: getattr(report, name) for name in REPORT_FEATURES},
    }

