"""The scikit-learn estimator: fit, refit, predict, predict_costs, explain, persistence."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
from scipy import special
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from shiftcost.costmodel.checks import (
    CostModelInputError,
    CostModelNotFittedError,
    _array_columns,
    _build_rows,
    _check_level,
    _feature_matrix,
    _finite,
    _jsonable,
    _keep_features,
    _params_to_json,
    _per_row,
    _require_features,
)
from shiftcost.costmodel.history import FORMAT, CostModelHistory, CostModelVersion
from shiftcost.costmodel.intervals import IMPUTATIONS, _check_enough, _conformal_scores, _folds, _loo_summary, _predict_z, _to_epochs
from shiftcost.costmodel.tobit import _fit_tobit, _fit_tobit_with_offsets, _model_arrays, _mu
from shiftcost.features import KNOWN_FEATURES, SHIFT_FEATURES, Feature

#: Sign each coefficient is held to when ``monotone=True`` (+1: cost rises with the feature).
DEFAULT_SIGNS: dict[str, int] = {name: 1 for name in SHIFT_FEATURES} | {
    Feature.ACCURACY: -1,
    Feature.MEAN_LOSS: 1,
    Feature.MEAN_ENTROPY: 0,
    Feature.MEAN_CONFIDENCE: 0,
}
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class CostPrediction:
    """Predicted cost of retraining on one batch, with a prediction interval.

    Energy and emission fields are ``None`` when samples, joules per sample-epoch or carbon
    intensity were not supplied; an infinite upper bound means the calibration data are too
    few for a finite interval at this level (``to_dict`` writes it as ``None``).
    ``extrapolated`` names the features outside the range the model was fitted on: a linear
    model in log-epochs extrapolates exponentially, so treat such predictions with care.
    ``epochs`` is the full model's median; the bounds come from the held-out fold models
    (jackknife+ / CV+), so with a very unstable fit the point can fall outside them.
    """

    epochs: float
    epochs_lower: float
    epochs_upper: float
    energy_kwh: float | None
    energy_kwh_lower: float | None
    energy_kwh_upper: float | None
    emissions_kg: float | None
    emissions_kg_lower: float | None
    emissions_kg_upper: float | None
    level: float
    predicted_not_to_converge: bool
    p_not_converge: float | None
    max_epochs: float | None
    model_version: int
    features: dict[str, float] = field(default_factory=dict)
    extrapolated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (non-finite numbers become ``None``)."""
        return {key: _jsonable(value) for key, value in asdict(self).items()}

    def held_at(self, horizon_epochs: float) -> CostPrediction:
        """This prediction with epochs no larger than ``horizon_epochs``, energy and emissions
        with them (both are proportional to epochs); an infinite upper bound stays infinite.

        A model linear in log-epochs extrapolates exponentially: a kind it never saw can be
        predicted at millions of epochs, where the product's forecasts stop at a horizon.
        """
        changes: dict[str, float] = {}
        for epochs, energy, emissions in (
            ("epochs", "energy_kwh", "emissions_kg"),
            ("epochs_lower", "energy_kwh_lower", "emissions_kg_lower"),
            ("epochs_upper", "energy_kwh_upper", "emissions_kg_upper"),
        ):
            value = getattr(self, epochs)
            if math.isfinite(value) and value > horizon_epochs:
                changes[epochs] = horizon_epochs
                changes.update({name: getattr(self, name) * horizon_epochs / value for name in (energy, emissions) if getattr(self, name) is not None})
        return replace(self, **changes)


class CostModel(RegressorMixin, BaseEstimator):
    """Predict epochs (and kWh, kg CO2e) to reach the cutoff from a batch's index vector.

    Parameters
    ----------
    level:
        Default coverage of the prediction intervals (two-sided), e.g. 0.90.
    features:
        Feature names to use. ``None`` picks every known feature (``SHIFT_FEATURES`` then
        ``FREE_FEATURES``) that all training rows carry.
    monotone:
        ``True`` holds coefficients to ``DEFAULT_SIGNS`` (unknown features stay free),
        ``False`` leaves them all free, a mapping ``{feature: +1 | -1 | 0}`` overrides.
    alpha:
        Ridge penalty on standardised coefficients (0 = none).
    epochs_offset:
        Epochs added before the log: ``z = log(epochs + epochs_offset)``.
    max_epochs:
        Cap used to flag "predicted not to converge"; ``None`` uses the median of the epochs
        spent by the censored training runs (no flag when there were none).
    zero_cost_censored:
        Treat a run that needed no training (epochs = 0, the cutoff already met) as
        left-censored: it shows only that the latent need is at most zero, so the fitted
        line is not dragged towards the many zero-cost runs of mild shifts. ``False`` fits
        them as observations at ``log(epochs_offset)``.
    offset_features:
        Features (among ``features``) that enter ``log(epochs + epochs_offset)`` with their
        coefficient held at 1, offsets in the GLM sense: a feature that is itself a forecast of
        that quantity (the probe's learning curve) is then trusted at its own scale and the fit
        estimates only how far the outcome departs from it, where a fitted slope stretches or
        shrinks it to the calibration kinds.
    """

    def __init__(
        self,
        level: float = 0.90,
        features: Sequence[str] | None = None,
        monotone: bool | Mapping[str, int] = True,
        alpha: float = 1.0,
        epochs_offset: float = 1.0,
        max_epochs: float | None = None,
        zero_cost_censored: bool = True,
        offset_features: Sequence[str] | None = None,
    ) -> None:
        self.level = level
        self.features = features
        self.monotone = monotone
        self.alpha = alpha
        self.epochs_offset = epochs_offset
        self.max_epochs = max_epochs
        self.zero_cost_censored = zero_cost_censored
        self.offset_features = offset_features

    # -- fitting -------------------------------------------------------------------------

    def fit(
        self,
        X: Any,
        y: Any = None,
        censored: Any = None,
        groups: Any = None,
        *,
        feature_names: Sequence[str] | None = None,
        note: str = "",
    ) -> CostModel:
        """Fit a new version from calibration or retraining runs.

        ``X`` is a list of dicts (one per run) or a 2-D array with ``feature_names``. With
        dicts, ``y`` defaults to each row's ``"epochs"`` and ``censored`` to
        ``not row["reached_cutoff"]`` (or ``row["censored"]``); ``groups`` may be a key
        such as ``"corruption"``. For a censored run, ``y`` is the epochs spent before the
        cap. Like every scikit-learn estimator, ``fit`` starts afresh (a new history with
        version 1); :meth:`refit` is the way to add runs to a fitted model as a new version.
        """
        self._check_params()
        rows = _build_rows(X, y, censored, groups, feature_names)
        names = self._choose_features(rows, _array_columns(X, feature_names))
        params = _params_to_json(self.get_params())
        group_key = groups if isinstance(groups, str) else None
        return self._add_version(CostModelHistory(), rows, names, params, parent=None, note=note, group_key=group_key)

    def refit(
        self,
        new_rows: Any,
        y: Any = None,
        censored: Any = None,
        groups: Any = None,
        *,
        feature_names: Sequence[str] | None = None,
        note: str = "",
    ) -> CostModel:
        """Add real retraining outcomes (censored ones too) and fit a new version.

        The new version learns from the latest version's rows plus ``new_rows``, on the same
        features and parameters; the old version is kept unchanged. When the first fit took
        its groups from a row key (``groups="corruption"``), new rows are grouped by the same
        key; a run without a group is a fold of its own.
        """
        base = self._history().latest
        if groups is None and base.group_key is not None and not isinstance(new_rows, np.ndarray):
            groups = base.group_key
        rows = _build_rows(new_rows, y, censored, groups, feature_names)
        for number, row in enumerate(rows):
            _require_features(row["x"], base.features, number, base.version)
        combined = [dict(r) for r in base.rows] + rows
        return self._add_version(
            self.history_, combined, list(base.features), base.params, parent=base.version, note=note, group_key=base.group_key
        )

    def _add_version(
        self,
        history: CostModelHistory,
        rows: list[dict[str, Any]],
        names: list[str],
        params: Mapping[str, Any],
        *,
        parent: int | None,
        note: str,
        group_key: str | None,
    ) -> CostModel:
        """Fit a version on ``rows``, append it to ``history`` and make it the fitted model."""
        version = _fit_version(rows, names, params, history.next_number(), parent, note)
        version.group_key = group_key
        history.append(version)
        self._adopt(history)
        return self

    # -- prediction ----------------------------------------------------------------------

    def predict(self, X: Any, *, version: int | None = None, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """Median epochs to the cutoff, one per row of ``X``, as an array (scikit-learn's contract);
        :meth:`predict_costs` gives intervals, energy and emissions too."""
        chosen = self._history().get(version)
        matrix, _ = _feature_matrix(X, chosen.features, feature_names, chosen.version)
        intercept, coef, _ = _model_arrays(chosen.state["full"])
        offset = chosen.params["epochs_offset"]
        return np.maximum(np.exp(intercept + matrix @ coef) - offset, 0.0)

    def predict_costs(
        self,
        X: Any,
        *,
        samples: Any = None,
        joules_per_sample_epoch: Any = None,
        carbon_intensity: Any = None,
        max_epochs: float | None = None,
        level: float | None = None,
        version: int | None = None,
        feature_names: Sequence[str] | None = None,
        calibration_runs: Sequence[bool] | None = None,
    ) -> list[CostPrediction]:
        """One :class:`CostPrediction` per row of ``X``.

        ``samples`` (training samples per epoch), ``joules_per_sample_epoch`` and
        ``carbon_intensity`` (kg CO2e per kWh) are scalars or one value per row; when not
        given, dict rows may carry ``samples``, ``joules_per_sample_epoch`` and
        ``carbon_intensity_kg_per_kwh``. ``version`` picks an older fitted version.
        ``calibration_runs`` (one flag per row the version was fitted on) sizes the intervals on
        those runs' conformal scores alone: the stratum of a Mondrian interval.
        """
        chosen = self._history().get(version)
        level = chosen.params["level"] if level is None else level
        _check_level(level)
        matrix, raw_rows = _feature_matrix(X, chosen.features, feature_names, chosen.version)
        if calibration_runs is not None and len(calibration_runs) != len(chosen.rows):
            raise CostModelInputError(f"calibration_runs has {len(calibration_runs)} flags for the {len(chosen.rows)} runs version {chosen.version} was fitted on.")
        z_point, z_lo, z_hi, sigma = _predict_z(chosen, matrix, level, calibration_runs)
        offset = chosen.params["epochs_offset"]
        cap = max_epochs if max_epochs is not None else chosen.params.get("max_epochs")
        if cap is None:
            cap = chosen.state["cap_epochs"]
        m = matrix.shape[0]
        n_samples = _per_row(samples, raw_rows, "samples", m)
        joules = _per_row(joules_per_sample_epoch, raw_rows, "joules_per_sample_epoch", m)
        intensity = _per_row(carbon_intensity, raw_rows, "carbon_intensity_kg_per_kwh", m)
        low = np.asarray(chosen.state["feature_min"], dtype=float)
        high = np.asarray(chosen.state["feature_max"], dtype=float)
        outside = (matrix < low) | (matrix > high)
        predictions = []
        for i in range(m):
            epochs = _to_epochs(z_point[i], offset)
            lower = _to_epochs(z_lo[i], offset)
            upper = _to_epochs(z_hi[i], offset)
            p_fail = None
            flag = False
            if cap is not None:
                z_cap = math.log(cap + offset)
                p_fail = float(special.ndtr((z_point[i] - z_cap) / sigma))
                flag = bool(epochs >= cap or p_fail >= 0.5)
            kwh = _energy(n_samples[i], joules[i], (epochs, lower, upper))
            co2 = (
                tuple(value * intensity[i] for value in kwh)
                if kwh is not None and intensity[i] is not None
                else None
            )
            predictions.append(
                CostPrediction(
                    epochs=epochs,
                    epochs_lower=lower,
                    epochs_upper=upper,
                    energy_kwh=kwh[0] if kwh else None,
                    energy_kwh_lower=kwh[1] if kwh else None,
                    energy_kwh_upper=kwh[2] if kwh else None,
                    emissions_kg=co2[0] if co2 else None,
                    emissions_kg_lower=co2[1] if co2 else None,
                    emissions_kg_upper=co2[2] if co2 else None,
                    level=float(level),
                    predicted_not_to_converge=flag,
                    p_not_converge=p_fail,
                    max_epochs=None if cap is None else float(cap),
                    model_version=chosen.version,
                    features={name: float(v) for name, v in zip(chosen.features, matrix[i])},
                    extrapolated=[name for name, out in zip(chosen.features, outside[i]) if out],
                )
            )
        return predictions

    def explain(self, x: Any, *, version: int | None = None, feature_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Each feature's additive contribution to ``log(epochs + offset)`` for one input.

        Contributions are measured from the training mean of each feature: ``baseline`` is
        the prediction at the mean feature vector and ``baseline + sum(contributions)`` is
        the prediction for ``x``.
        """
        chosen = self._history().get(version)
        if isinstance(x, Mapping):
            x = [x]
        elif np.ndim(x) == 1:
            x = np.reshape(x, (1, -1))
        matrix, _ = _feature_matrix(x, chosen.features, feature_names, chosen.version)
        if matrix.shape[0] != 1:
            raise CostModelInputError(f"explain() takes one input row, got {matrix.shape[0]}; pass a single dict or a 1-row array.")
        intercept, coef, _ = _model_arrays(chosen.state["full"])
        mean = np.asarray(chosen.state["feature_mean"], dtype=float)
        contributions = coef * (matrix[0] - mean)
        baseline = float(intercept + coef @ mean)
        z = baseline + float(contributions.sum())
        offset = chosen.params["epochs_offset"]
        return {
            "model_version": chosen.version,
            "scale": f"log(epochs + {offset})",
            "baseline": baseline,
            "baseline_epochs": _to_epochs(baseline, offset),
            "contributions": {n: float(c) for n, c in zip(chosen.features, contributions)},
            "coefficients": {n: float(c) for n, c in zip(chosen.features, coef)},
            "feature_mean": {n: float(m) for n, m in zip(chosen.features, mean)},
            "log_epochs": z,
            "epochs": _to_epochs(z, offset),
        }

    # -- persistence ---------------------------------------------------------------------

    def to_json(self) -> str:
        """All parameters and every fitted version as plain JSON."""
        payload = {"format": FORMAT, "params": _params_to_json(self.get_params()), "history": self._history().to_list()}
        return json.dumps(payload, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        """Rebuild a model saved with :meth:`to_json`; predictions are reproduced exactly."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise CostModelInputError(f"the saved cost model is not valid JSON ({error}); save it again with CostModel.to_json().") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CostModelInputError(f"the saved cost model is not in format {FORMAT!r}; save it again with CostModel.to_json().")
        model = cls(**payload["params"])
        history = CostModelHistory.from_list(payload["history"])
        if len(history):
            model._adopt(history)
        return model

    @classmethod
    def from_versions(cls, versions: Iterable[CostModelVersion | Mapping[str, Any]]) -> CostModel:
        """Rebuild a model from stored versions (dicts from ``CostModelVersion.to_dict()``);
        its parameters are those of the latest version."""
        history = CostModelHistory(v if isinstance(v, CostModelVersion) else CostModelVersion.from_dict(v) for v in versions)
        history.versions.sort(key=lambda v: v.version)
        model = cls(**history.latest.params)
        model._adopt(history)
        return model

    # -- internals -----------------------------------------------------------------------

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = True  # epochs to the cutoff are >= 0
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        history = getattr(self, "history_", None)
        return history is not None and len(history) > 0

    def _history(self) -> CostModelHistory:
        try:
            check_is_fitted(self)
        except NotFittedError:
            raise CostModelNotFittedError("the cost model has not been fitted; call fit() with calibration runs first.") from None
        return self.history_

    def _check_params(self) -> None:
        _check_level(self.level)
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0 and math.isfinite(self.alpha)):
            raise CostModelInputError(f"alpha must be a finite number >= 0, got {self.alpha!r}.")
        if not (isinstance(self.epochs_offset, (int, float)) and self.epochs_offset > 0):
            raise CostModelInputError(f"epochs_offset must be > 0 so that zero-cost runs stay finite, got {self.epochs_offset!r}.")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise CostModelInputError(f"max_epochs must be > 0 or None, got {self.max_epochs!r}.")

    def _choose_features(self, rows: list[dict[str, Any]], columns: list[str] | None) -> list[str]:
        """The ``features`` parameter, else an array's columns, else every known feature all rows carry."""
        if self.features is None and columns is not None:
            names = columns
        elif self.features is not None:
            names = [str(n) for n in self.features]
            if not names:
                raise CostModelInputError("features is empty; name at least one index, e.g. ['resque_dist'].")
        else:
            names = [str(n) for n in KNOWN_FEATURES if all(_finite(r["x"].get(n)) for r in rows)]
            if not names:
                raise CostModelInputError(
                    f"no training row set carries a complete known feature (looked for {[str(f) for f in KNOWN_FEATURES]}); "
                    "add index values to the rows or name features explicitly."
                )
        for number, row in enumerate(rows):
            _require_features(row["x"], names, number, None)
        unknown = [str(n) for n in self.offset_features or () if n not in names]
        if unknown:
            raise CostModelInputError(f"offset_features {unknown} are not among the features {names}; name each offset as a feature too.")
        return names

    def _adopt(self, history: CostModelHistory) -> None:
        """Expose the latest version through scikit-learn style fitted attributes."""
        latest = history.latest
        intercept, coef, sigma = _model_arrays(latest.state["full"])
        self.history_ = history
        self.version_ = latest.version
        self.features_ = list(latest.features)
        self.n_features_in_ = len(latest.features)
        self.feature_names_in_ = np.array(latest.features, dtype=object)
        self.signs_ = list(latest.signs)
        self.intercept_ = float(intercept)
        self.coef_ = coef
        self.sigma_ = float(sigma)
        self.n_train_ = len(latest.rows)
        self.n_censored_ = int(sum(bool(r["censored"]) for r in latest.rows))
        self.cap_epochs_ = latest.state["cap_epochs"]
        self.loo_ = dict(latest.loo)
        free = latest.state.get("free_coef")
        #: Every coefficient as a fit without offsets gives it (``None`` when there are no offsets).
        self.free_coef_ = None if free is None else np.asarray(free, dtype=float)


# ----------------------------------------------------------------------------- one version


def _signs(monotone: Any, names: Sequence[str]) -> list[int]:
    if monotone is True:
        return [DEFAULT_SIGNS.get(n, 0) for n in names]
    if monotone is False or monotone is None:
        return [0] * len(names)
    if isinstance(monotone, Mapping):
        signs = [int(monotone.get(n, DEFAULT_SIGNS.get(n, 0))) for n in names]
        if any(s not in (-1, 0, 1) for s in signs):
            raise CostModelInputError(f"monotone signs must be -1, 0 or +1, got {dict(monotone)!r}.")
        return signs
    raise CostModelInputError(f"monotone must be True, False or a mapping feature -> sign, got {monotone!r}.")


def _fit_version(
    rows: list[dict[str, Any]], names: list[str], params: Mapping[str, Any], number: int, parent: int | None, note: str
) -> CostModelVersion:
    """Fit one version with these parameters (``refit`` passes the base version's, not the estimator's)."""
    # Dozens of tiny solves: BLAS threads only contend with each other (25x slower on a busy 2-core box).
    with threadpool_limits(1, user_api="blas"):
        return _fit_version_single_threaded(rows, names, params, number, parent, note)

def _fit_version_single_threaded(
    rows: list[dict[str, Any]], names: list[str], params: Mapping[str, Any], number: int, parent: int | None, note: str
) -> CostModelVersion:
    signs = _signs(params["monotone"], names)
    level, alpha, offset = params["level"], params["alpha"], params["epochs_offset"]
    rows = _keep_features(rows, names)
    X = np.array([[float(r["x"][n]) for n in names] for r in rows], dtype=float)
    epochs = np.array([r["epochs"] for r in rows], dtype=float)
    cens = np.array([r["censored"] for r in rows], dtype=bool)
    z = np.log(epochs + offset)
    sign_arr = np.asarray(signs)
    kind = np.where(cens, 1, 0)
    if params.get("zero_cost_censored", True):
        kind[(epochs == 0) & ~cens] = -1
    offsets = [names.index(n) for n in params.get("offset_features") or ()]
    missing = _check_enough(len(names) - len(offsets), kind, level)
    alpha = alpha + missing  # the prior stands in for the runs that are missing

    full = _fit_tobit_with_offsets(X, z, kind, sign_arr, alpha, offsets)
    # What the held coefficients would be if fitted: an offset that calibration's points run against
    # (a fitted weight held at its sign bound) says nothing of cost, and callers can tell.
    free_coef = _fit_tobit(X, z, kind, sign_arr, alpha)["coef"] if offsets else None
    folds, cv_kind = _folds([r.get("group") for r in rows])
    fold_models = []
    fold_of_row = np.empty(len(rows), dtype=int)
    for k, members in enumerate(folds):
        keep = np.ones(len(rows), dtype=bool)
        keep[members] = False
        if (kind[keep] == 0).sum() < 2:
            left_out = rows[int(members[0])].get("group")
            raise CostModelInputError(
                f"leaving out group {left_out!r} leaves fewer than 2 runs with a positive cost that reached the cutoff; "
                "add such runs or fit without groups."
            )
        fold_models.append(_fit_tobit_with_offsets(X[keep], z[keep], kind[keep], sign_arr, alpha, offsets, start=full))
        fold_of_row[members] = k

    loo_mu = np.array([_mu(fold_models[fold_of_row[i]], X[i]) for i in range(len(rows))])
    loo_sigma = np.array([fold_models[fold_of_row[i]]["sigma"] for i in range(len(rows))])
    scores = _conformal_scores(z, loo_mu, loo_sigma, kind, IMPUTATIONS)
    cap_epochs = float(np.median(epochs[cens])) if cens.any() else None
    state = {
        "full": full,
        "folds": fold_models,
        "fold_of_row": fold_of_row.tolist(),
        "scores": scores,
        "imputations": IMPUTATIONS,
        "feature_mean": X.mean(axis=0).tolist(),
        "feature_min": X.min(axis=0).tolist(),
        "feature_max": X.max(axis=0).tolist(),
        "cap_epochs": cap_epochs,
        "prior_runs": missing,
        "free_coef": free_coef,
    }
    loo = _loo_summary(epochs, cens, loo_mu, scores, fold_of_row, level, offset, cv_kind)
    return CostModelVersion(
        version=number,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        params=dict(params),
        features=list(names),
        signs=[int(s) for s in signs],
        rows=rows,
        state=state,
        loo=loo,
        parent=parent,
        note=note,
    )


def _energy(samples: float | None, joules: float | None, epochs: tuple[float, ...]) -> tuple[float, ...] | None:
    if samples is None or joules is None:
        return None
    return tuple(e * samples * joules / JOULES_PER_KWH for e in epochs)
