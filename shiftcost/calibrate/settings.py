"""What a sweep measures and writes: feature sets, columns, default sweeps and settings."""

from __future__ import annotations

from collections.abc import Callable

from shiftcost.features import COST_FEATURES, Feature  # noqa: F401 (COST_FEATURES is part of the sweep's settings)
from shiftcost.forecast import protocol
from shiftcost.forecast.probe import PROBE_FEATURES
from shiftcost.recipe import Caps, Cutoff, RetrainConfig


#: The indices proper (what the papers propose as predictors of retraining cost).
INDEX_FEATURES: tuple[str, ...] = (Feature.RESQUE_DIST, Feature.INV_ARI, Feature.LAYER_SHIFT, Feature.PREINDEX_P)
#: Everything correlated with the measures: the indices plus the free figures of the same pass.
CORRELATION_FEATURES: tuple[str, ...] = INDEX_FEATURES + ("accuracy_drop", Feature.MEAN_LOSS, Feature.MEAN_ENTROPY, Feature.MEAN_CONFIDENCE)
#: What retraining cost, per point.
CORRELATION_MEASURES: tuple[str, ...] = (
    "steps",
    "epochs",
    "energy_kwh",
    "emissions_kg",
    "grad_norm",
    "initial_grad_norm",
    "param_change",
)

#: Features that need no labels: the forecast of a batch whose labels have not come yet.
#: (``resque_dist`` groups by label when there are labels, so its value depends on them.)
LABEL_FREE_FEATURES: tuple[str, ...] = (Feature.INV_ARI, Feature.LAYER_SHIFT, Feature.MEAN_ENTROPY, Feature.MEAN_CONFIDENCE)
LABEL_FREE_FILE = "costmodel-label-free.json"


#: Sweep defaults: the measurement protocol's holdout and cadence (shiftcost.forecast.protocol),
#: the same as every other retrain's, and its 15-epoch cap.
SWEEP_CONFIG = RetrainConfig(cutoff=Cutoff(holdout_fraction=protocol.HOLDOUT_FRACTION), caps=Caps(max_epochs=protocol.MAX_EPOCHS))

#: A reduced sweep for smoke tests: two kinds, three intensities each.
QUICK_SWEEP: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.0, 0.1, 0.2),
    "contrast": (0.0, 0.2, 0.4),
}

GROUP_KEY = "corruption"
PLOT_NAME = "resque_dist_vs_energy.png"

#: Row columns written to the CSV, in this order (``runs`` and ``notes`` go to JSON only).
COLUMNS: tuple[str, ...] = (
    "corruption",
    "intensity",
    "status",
    "reached_cutoff",
    "censored",
    "repeats",
    "statuses",
    "resque_dist",
    "inv_ari",
    "layer_shift",
    "preindex_p",
    "accuracy",
    "accuracy_drop",
    "mean_loss",
    "mean_entropy",
    "mean_confidence",
    "reference_accuracy",
    "target_accuracy",
    "initial_accuracy",
    "final_accuracy",
    "steps",
    "epochs",
    "energy_kwh",
    "emissions_kg",
    "grad_norm",
    "first_grad_norm",
    "initial_grad_norm",
    "param_change",
    "wall_time_s",
    "train_time_s",
    "samples",
    "holdout_samples",
    "max_steps",
    "carbon_intensity_kg_per_kwh",
    "energy_measured",
    "energy_method",
    "index_seconds",
    "point_seconds",
    *PROBE_FEATURES,
    "probe_sample_gradients",
    "probe_seconds",
    "probe_already_met",
    "error",
)

Progress = Callable[[int, int, str], None]
