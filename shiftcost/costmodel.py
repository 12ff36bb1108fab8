"""From shift indices to predicted retraining cost: epochs, kWh and kg CO2e with intervals.

Method (chosen for 20-60 calibration runs, some of which never reach the cutoff):

* Target. ``z = log(epochs + epochs_offset)`` (``log1p`` with the default offset of one
  epoch), so a zero-cost retrain (the cutoff already met) is representable and errors are
  roughly relative for long runs. Point predictions are the model's median,
  ``max(exp(mu) - offset, 0)``.
* Censoring. A run stopped by its step/epoch cap only tells us ``epochs >= spent``. The
  fit is a Tobit model (censored Gaussian regression) on ``z``: runs that reached the
  cutoff contribute the normal density, capped runs the probability of exceeding what they
  spent. A run that needed no training at all is, by default, left-censored at zero: it
  shows only that the latent need is at most zero, so the many zero-cost runs of mild shifts
  do not drag the line down. The likelihood is maximised in Olsen's parametrisation
  (``delta = beta / sigma``, ``tau = 1 / sigma``), where it is concave, so L-BFGS-B with
  bounds finds the unique optimum. A ridge penalty ``alpha / 2 * ||delta||^2`` on
  standardised features keeps the fit stable with correlated indices and few runs; without
  censoring it is exactly ridge regression.
* Monotonicity. Coefficients of shift indices are bounded to be >= 0 (more shift never
  predicts less cost), the current model's accuracy on the new batch to be <= 0 and its
  mean loss >= 0 (further from the cutoff costs more). Prediction entropy is left free:
  overconfident wrong predictions under noise make its sign type-dependent. (A linear model
  with these bounds was compared with a free linear model and with isotonic regression on
  the fitted linear score; the bounded linear model was as good as the others on
  leave-one-type-out tests, and isotonic steps cannot extrapolate at all.)
* Intervals. Jackknife+ (Barber, Candès, Ramdas, Tibshirani 2021), or CV+ when groups
  (e.g. corruption types) are given, in which case the folds are the groups so the
  residuals measure the error of predicting an unseen kind of shift. A censored calibration
  run's residual is only bounded; it enters the conformal quantile as 19 equally weighted
  scores at the conditional quantiles of the fold model's residual given that bound (so a
  capped run is never a point at the cap, and its uncertainty widens the interval).
  Coverage is distribution-free when nothing is censored (the scheme then reduces exactly
  to jackknife+ / CV+) and rests on the Tobit model for the censored runs otherwise.
* Few runs: a prior, not a refusal. The full model needs :func:`min_points_needed` runs
  with an exactly known cost (``n_features + 3``, and ``ceil(level / (1 - level))`` for a
  finite interval: 9 at 90% with up to 6 features). With fewer (but at least 2), it is
  still fitted, shrunk toward the constant prior (the runs' mean log epochs, every index
  ignored): the ridge strength grows by one per missing run, so the prior stands in for the
  runs that are missing and fades as they come. Its intervals are conformal as always,
  which with so few runs makes the upper bound infinite (unknown); the version records
  ``state["prior_runs"]``, the number of runs the prior stood in for.
* Units. Interval bounds on epochs map to energy and emissions through the same monotone
  (linear) transform: ``kWh = epochs * samples * J_per_sample_epoch / 3.6e6`` and
  ``kg CO2e = kWh * carbon_intensity_kg_per_kwh``.

Every fit is kept as a :class:`CostModelVersion` (its training rows, parameters, fitted
state and leave-one-out error) in a :class:`CostModelHistory` that round-trips through
plain JSON, so a stored prediction can always be reproduced and explained.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from scipy import optimize, special
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from threadpoolctl import threadpool_limits

from shiftcost.errors import InputError

__all__ = [
    "FREE_FEATURES",
    "SHIFT_FEATURES",
    "CostModel",
    "CostModelHistory",
    "CostModelNotFittedError",
    "CostModelVersion",
    "CostPrediction",
    "GroupOutReport",
    "estimate_joules_per_sample_epoch",
    "leave_one_group_out",
    "min_points_needed",
]

#: Shift indices, in the order the feature vector uses when they are present.
SHIFT_FEATURES: tuple[str, ...] = ("resque_dist", "inv_ari", "layer_shift", "resque_task", "preindex_p")
#: Figures from the same forward pass over the new batch (accuracy and loss need labels).
FREE_FEATURES: tuple[str, ...] = ("accuracy", "mean_loss", "mean_entropy")
KNOWN_FEATURES: tuple[str, ...] = SHIFT_FEATURES + FREE_FEATURES

#: Sign each coefficient is held to when ``monotone=True`` (+1: cost rises with the feature).
DEFAULT_SIGNS: dict[str, int] = {name: 1 for name in SHIFT_FEATURES} | {
    "accuracy": -1,
    "mean_loss": 1,
    "mean_entropy": 0,
}

JOULES_PER_KWH = 3.6e6
FORMAT = "shiftcost.costmodel/1"
#: Conditional quantiles that stand in for one censored run's unknown conformal score.
IMPUTATIONS = 19
_EPS = 1e-9


# ----------------------------------------------------------------------------- results


class CostModelNotFittedError(InputError, NotFittedError):
    """Used before ``fit``: scikit-learn's ``NotFittedError`` and the command line's one-sentence error."""


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


@dataclass
class CostModelVersion:
    """One fitted version: what it learned from, how, and how well (leave-one-out)."""

    version: int
    created_at: str
    params: dict[str, Any]
    features: list[str]
    signs: list[int]
    rows: list[dict[str, Any]]
    state: dict[str, Any]
    loo: dict[str, Any]
    parent: int | None = None
    note: str = ""
    group_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModelVersion:
        return cls(**dict(data))


class CostModelHistory:
    """Every fitted version of a cost model, oldest first; versions are never changed."""

    def __init__(self, versions: Iterable[CostModelVersion] = ()) -> None:
        self.versions: list[CostModelVersion] = list(versions)

    def __len__(self) -> int:
        return len(self.versions)

    def __iter__(self):
        return iter(self.versions)

    @property
    def latest(self) -> CostModelVersion:
        if not self.versions:
            raise InputError("the cost model has no fitted version yet; call fit() with calibration runs first.")
        return self.versions[-1]

    def get(self, version: int | None = None) -> CostModelVersion:
        """The version with this number (the latest when ``None``)."""
        if version is None:
            return self.latest
        for candidate in self.versions:
            if candidate.version == version:
                return candidate
        known = [v.version for v in self.versions]
        raise InputError(f"cost model version {version} does not exist (known versions: {known}); pick one of those.")

    def append(self, version: CostModelVersion) -> None:
        self.versions.append(version)

    def next_number(self) -> int:
        return self.versions[-1].version + 1 if self.versions else 1

    def to_list(self) -> list[dict[str, Any]]:
        return [v.to_dict() for v in self.versions]

    def to_json(self) -> str:
        return json.dumps(self.to_list(), allow_nan=False)

    @classmethod
    def from_list(cls, data: Iterable[Mapping[str, Any]]) -> CostModelHistory:
        return cls(CostModelVersion.from_dict(item) for item in data)

    @classmethod
    def from_json(cls, text: str) -> CostModelHistory:
        return cls.from_list(json.loads(text))


# ----------------------------------------------------------------------------- estimator


class CostModel(BaseEstimator):
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
    ) -> None:
        self.level = level
        self.features = features
        self.monotone = monotone
        self.alpha = alpha
        self.epochs_offset = epochs_offset
        self.max_epochs = max_epochs
        self.zero_cost_censored = zero_cost_censored

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
        names = self._choose_features(rows)
        history = CostModelHistory()
        version = self._fit_version(rows, names, history.next_number(), parent=None, note=note)
        version.group_key = groups if isinstance(groups, str) else None
        history.append(version)
        self._adopt(history)
        return self

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
        previous = self.get_params()
        try:
            self.set_params(**base.params)
            version = self._fit_version(combined, list(base.features), self.history_.next_number(), base.version, note)
        finally:
            self.set_params(**previous)
        version.group_key = base.group_key
        self.history_.append(version)
        self._adopt(self.history_)
        return self

    # -- prediction ----------------------------------------------------------------------

    def predict(
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
    ) -> list[CostPrediction]:
        """One :class:`CostPrediction` per row of ``X``.

        ``samples`` (training samples per epoch), ``joules_per_sample_epoch`` and
        ``carbon_intensity`` (kg CO2e per kWh) are scalars or one value per row; when not
        given, dict rows may carry ``samples``, ``joules_per_sample_epoch`` and
        ``carbon_intensity_kg_per_kwh``. ``version`` picks an older fitted version.
        """
        chosen = self._history().get(version)
        level = chosen.params["level"] if level is None else level
        _check_level(level)
        matrix, raw_rows = _feature_matrix(X, chosen.features, feature_names, chosen.version)
        z_point, z_lo, z_hi, sigma = _predict_z(chosen, matrix, level)
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

    def predict_epochs(self, X: Any, *, version: int | None = None, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """Point predictions of epochs only, as an array (scikit-learn style)."""
        chosen = self._history().get(version)
        matrix, _ = _feature_matrix(X, chosen.features, feature_names, chosen.version)
        intercept, coef, _ = _model_arrays(chosen.state["full"])
        offset = chosen.params["epochs_offset"]
        return np.maximum(np.exp(intercept + matrix @ coef) - offset, 0.0)

    def explain(self, x: Any, *, version: int | None = None, feature_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Each feature's additive contribution to ``log(epochs + offset)`` for one input.

        Contributions are measured from the training mean of each feature: ``baseline`` is
        the prediction at the mean feature vector and ``baseline + sum(contributions)`` is
        the prediction for ``x``.
        """
        chosen = self._history().get(version)
        if isinstance(x, Mapping):
            x = [x]
        matrix, _ = _feature_matrix(x, chosen.features, feature_names, chosen.version)
        if matrix.shape[0] != 1:
            raise InputError(f"explain() takes one input row, got {matrix.shape[0]}; pass a single dict or a 1-row array.")
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
            raise InputError(f"the saved cost model is not valid JSON ({error}); save it again with CostModel.to_json().") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InputError(f"the saved cost model is not in format {FORMAT!r}; save it again with CostModel.to_json().")
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

    def _history(self) -> CostModelHistory:
        history = getattr(self, "history_", None)
        if history is None or not len(history):
            raise CostModelNotFittedError("the cost model has not been fitted; call fit() with calibration runs first.")
        return history

    def _check_params(self) -> None:
        _check_level(self.level)
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0 and math.isfinite(self.alpha)):
            raise InputError(f"alpha must be a finite number >= 0, got {self.alpha!r}.")
        if not (isinstance(self.epochs_offset, (int, float)) and self.epochs_offset > 0):
            raise InputError(f"epochs_offset must be > 0 so that zero-cost runs stay finite, got {self.epochs_offset!r}.")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise InputError(f"max_epochs must be > 0 or None, got {self.max_epochs!r}.")

    def _choose_features(self, rows: list[dict[str, Any]]) -> list[str]:
        if self.features is not None:
            names = list(self.features)
            if not names:
                raise InputError("features is empty; name at least one index, e.g. ['resque_dist'].")
        else:
            names = [n for n in KNOWN_FEATURES if all(_finite(r["x"].get(n)) for r in rows)]
            if not names:
                raise InputError(
                    f"no training row set carries a complete known feature (looked for {list(KNOWN_FEATURES)}); "
                    "add index values to the rows or name features explicitly."
                )
        for number, row in enumerate(rows):
            _require_features(row["x"], names, number, None)
        return names

    def _signs(self, names: Sequence[str]) -> list[int]:
        if self.monotone is True:
            return [DEFAULT_SIGNS.get(n, 0) for n in names]
        if self.monotone is False or self.monotone is None:
            return [0] * len(names)
        if isinstance(self.monotone, Mapping):
            signs = [int(self.monotone.get(n, DEFAULT_SIGNS.get(n, 0))) for n in names]
            if any(s not in (-1, 0, 1) for s in signs):
                raise InputError(f"monotone signs must be -1, 0 or +1, got {dict(self.monotone)!r}.")
            return signs
        raise InputError(f"monotone must be True, False or a mapping feature -> sign, got {self.monotone!r}.")

    def _fit_version(
        self, rows: list[dict[str, Any]], names: list[str], number: int, parent: int | None, note: str
    ) -> CostModelVersion:
        # Dozens of tiny solves: BLAS threads only contend with each other (25x slower on a busy 2-core box).
        with threadpool_limits(1, user_api="blas"):
            return self._fit_version_single_threaded(rows, names, number, parent, note)

    def _fit_version_single_threaded(
        self, rows: list[dict[str, Any]], names: list[str], number: int, parent: int | None, note: str
    ) -> CostModelVersion:
        signs = self._signs(names)
        rows = _keep_features(rows, names)
        X = np.array([[float(r["x"][n]) for n in names] for r in rows], dtype=float)
        epochs = np.array([r["epochs"] for r in rows], dtype=float)
        cens = np.array([r["censored"] for r in rows], dtype=bool)
        z = np.log(epochs + self.epochs_offset)
        sign_arr = np.asarray(signs)
        kind = np.where(cens, 1, 0)
        if self.zero_cost_censored:
            kind[(epochs == 0) & ~cens] = -1
        missing = _check_enough(len(names), kind, self.level)
        alpha = self.alpha + missing  # the prior stands in for the runs that are missing

        full = _fit_tobit(X, z, kind, sign_arr, alpha)
        folds, cv_kind = _folds([r.get("group") for r in rows])
        fold_models = []
        fold_of_row = np.empty(len(rows), dtype=int)
        for k, members in enumerate(folds):
            keep = np.ones(len(rows), dtype=bool)
            keep[members] = False
            if (kind[keep] == 0).sum() < 2:
                raise InputError(
                    f"leaving out fold {k} leaves fewer than 2 runs with a positive cost that reached the cutoff; "
                    "add such runs or fit without groups."
                )
            fold_models.append(_fit_tobit(X[keep], z[keep], kind[keep], sign_arr, alpha, start=full))
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
        }
        loo = _loo_summary(epochs, cens, loo_mu, scores, fold_of_row, self.level, self.epochs_offset, cv_kind)
        return CostModelVersion(
            version=number,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            params=_params_to_json(self.get_params()),
            features=list(names),
            signs=[int(s) for s in signs],
            rows=rows,
            state=state,
            loo=loo,
            parent=parent,
            note=note,
        )

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


# ----------------------------------------------------------------------------- evaluation


@dataclass
class GroupOutReport:
    """Leave-one-group-out evaluation: per-run predictions and a summary."""

    points: list[dict[str, Any]]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [{k: _json_number(v) for k, v in p.items()} for p in self.points],
            "summary": _jsonable(self.summary),
        }


def estimate_joules_per_sample_epoch(rows: Iterable[Mapping[str, Any]]) -> float:
    """Median of ``energy_kwh * 3.6e6 / (epochs * samples)`` over runs that reached the cutoff.

    A stand-in for the hardware probe when only calibration runs are at hand.
    """
    values = []
    for row in rows:
        if _row_censored(row) or not all(_finite(row.get(k)) for k in ("energy_kwh", "epochs", "samples")):
            continue
        if row["epochs"] > 0 and row["samples"] > 0 and row["energy_kwh"] > 0:
            values.append(row["energy_kwh"] * JOULES_PER_KWH / (row["epochs"] * row["samples"]))
    if not values:
        raise InputError(
            "no run that reached the cutoff has positive energy_kwh, epochs and samples, so joules per "
            "sample-epoch cannot be estimated; pass joules_per_sample_epoch from the hardware probe."
        )
    return float(np.median(values))


def leave_one_group_out(
    rows: Sequence[Mapping[str, Any]],
    group_key: str = "corruption",
    *,
    level: float = 0.90,
    joules_per_sample_epoch: float | None = None,
    group_folds: bool = True,
    **model_params: Any,
) -> GroupOutReport:
    """Fit on all other groups (e.g. corruption types), predict the held-out group, repeat.

    Energy is predicted with ``joules_per_sample_epoch`` when given, else with the value
    :func:`estimate_joules_per_sample_epoch` finds on the training groups alone. With
    ``group_folds`` the intervals come from CV+ over the training groups.

    Summary figures: ``mdape_energy`` / ``mdape_epochs`` (median absolute percentage error
    over runs that reached the cutoff with positive cost) and ``coverage_energy`` /
    ``coverage_epochs`` (fraction of runs that reached the cutoff whose measured value lies
    in the interval). A censored run's truth is unknown; it counts as a definite miss when
    the upper bound is below what it already spent, and is reported separately.
    ``seen_types_loo`` gives, for contrast, the leave-one-run-out figures of a model fitted on
    all groups (every held-out run's type is then represented in training).
    """
    rows = [dict(r) for r in rows]
    labels = [r.get(group_key) for r in rows]
    if any(label is None for label in labels):
        raise InputError(f"every run needs a {group_key!r} value for leave-one-group-out; some have none.")
    distinct = list(dict.fromkeys(labels))
    if len(distinct) < 2:
        raise InputError(f"leave-one-group-out needs at least 2 values of {group_key!r}, got {distinct}.")
    points: list[dict[str, Any]] = []
    for held_out in distinct:
        train = [r for r, g in zip(rows, labels) if g != held_out]
        test = [r for r, g in zip(rows, labels) if g == held_out]
        model = CostModel(level=level, **model_params)
        model.fit(train, groups=group_key if group_folds else None)
        joules = joules_per_sample_epoch or estimate_joules_per_sample_epoch(train)
        preds = model.predict(test, joules_per_sample_epoch=joules, carbon_intensity=None)
        for row, pred in zip(test, preds):
            points.append(_score_point(row, pred, group_key, joules))
    summary = _group_summary(points, group_key, level)
    summary["model_params"] = dict(model_params)
    summary["group_folds"] = group_folds
    # For contrast: the same model's leave-one-run-out error when every type is seen in training.
    summary["seen_types_loo"] = CostModel(level=level, **model_params).fit(rows).loo_
    return GroupOutReport(points=points, summary=summary)


def _score_point(row: Mapping[str, Any], pred: CostPrediction, group_key: str, joules: float) -> dict[str, Any]:
    censored = _row_censored(row)
    epochs = float(row["epochs"])
    energy = row.get("energy_kwh")
    energy = float(energy) if _finite(energy) else None
    point = {
        group_key: row[group_key],
        "intensity": row.get("intensity"),
        "censored": censored,
        "epochs": epochs,
        "epochs_pred": pred.epochs,
        "epochs_lower": pred.epochs_lower,
        "epochs_upper": pred.epochs_upper,
        "energy_kwh": energy,
        "energy_kwh_pred": pred.energy_kwh,
        "energy_kwh_lower": pred.energy_kwh_lower,
        "energy_kwh_upper": pred.energy_kwh_upper,
        "joules_per_sample_epoch": joules,
        "predicted_not_to_converge": pred.predicted_not_to_converge,
        "p_not_converge": pred.p_not_converge,
    }
    if censored:
        point["epochs_covered"] = None if pred.epochs_upper >= epochs else False
        point["energy_covered"] = (
            None if energy is None or pred.energy_kwh_upper is None or pred.energy_kwh_upper >= energy else False
        )
        point["ape_epochs"] = point["ape_energy"] = None
    else:
        point["epochs_covered"] = bool(pred.epochs_lower <= epochs <= pred.epochs_upper)
        point["energy_covered"] = (
            None if energy is None or pred.energy_kwh is None else bool(pred.energy_kwh_lower <= energy <= pred.energy_kwh_upper)
        )
        point["ape_epochs"] = abs(pred.epochs - epochs) / epochs if epochs > 0 else None
        point["ape_energy"] = (
            abs(pred.energy_kwh - energy) / energy if energy and energy > 0 and epochs > 0 and pred.energy_kwh is not None else None
        )
    return point


def _group_summary(points: list[dict[str, Any]], group_key: str, level: float) -> dict[str, Any]:
    def summarise(subset: list[dict[str, Any]]) -> dict[str, Any]:
        def median(key: str) -> float | None:
            values = [p[key] for p in subset if p[key] is not None]
            return float(np.median(values)) if values else None

        def coverage(key: str) -> float | None:
            values = [p[key] for p in subset if not p["censored"] and p[key] is not None]
            return float(np.mean(values)) if values else None

        censored = [p for p in subset if p["censored"]]
        return {
            "n": len(subset),
            "n_censored": len(censored),
            "n_ape": sum(p["ape_energy"] is not None for p in subset),
            "mdape_energy": median("ape_energy"),
            "mdape_epochs": median("ape_epochs"),
            "coverage_energy": coverage("energy_covered"),
            "coverage_epochs": coverage("epochs_covered"),
            "censored_flagged": sum(bool(p["predicted_not_to_converge"]) for p in censored),
            "censored_definite_misses": sum(p["epochs_covered"] is False for p in censored),
        }

    summary = summarise(points) | {"level": level, "group_key": group_key}
    groups = list(dict.fromkeys(p[group_key] for p in points))
    summary["per_group"] = {str(g): summarise([p for p in points if p[group_key] == g]) for g in groups}
    return summary


# ----------------------------------------------------------------------------- the Tobit fit


def _fit_tobit(
    X: np.ndarray,
    z: np.ndarray,
    kind: np.ndarray,
    signs: np.ndarray,
    alpha: float,
    start: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Penalised censored Gaussian regression of ``z`` on ``X`` with sign bounds.

    ``kind`` is 0 where ``z`` is observed, +1 where only ``z_true >= z`` is known (the cap
    was hit) and -1 where only ``z_true <= z`` is known (no training was needed). Returns
    the model on the raw feature scale: ``{"intercept", "coef", "sigma"}``.
    """
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a constant feature carries no information; ridge keeps it at 0
    design = np.column_stack([np.ones(len(z)), (X - mean) / scale])
    p = design.shape[1]
    obs, cen = kind == 0, kind != 0
    side = kind[cen].astype(float)  # +1 right-censored, -1 left-censored
    n_obs = int(obs.sum())
    penalty = np.concatenate([[0.0], np.full(p - 1, alpha)])
    # Sliced once: the objective runs a few hundred times per fit and indexing dominates it.
    d_obs, z_obs, d_cen, z_cen = design[obs], z[obs], design[cen], z[cen]
    log_sqrt_2pi = 0.5 * math.log(2 * math.pi)
    grad = np.empty(p + 1)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        delta, tau = theta[:-1], theta[-1]
        resid = tau * z_obs - d_obs @ delta
        b = side * (d_cen @ delta - tau * z_cen)  # log-probability of the censored side is log_ndtr(b)
        log_cdf = special.log_ndtr(b)
        mills = side * np.exp(-0.5 * b * b - log_sqrt_2pi - log_cdf)
        value = -n_obs * math.log(tau) + 0.5 * (resid @ resid) - log_cdf.sum() + 0.5 * (penalty @ (delta * delta))
        grad[:-1] = -(resid @ d_obs) - (mills @ d_cen) + penalty * delta
        grad[-1] = -n_obs / tau + resid @ z_obs + mills @ z_cen
        return value, grad.copy()

    spread = float(np.std(z[obs])) if n_obs > 1 else 1.0
    spread = spread if spread > 1e-12 else 1.0
    if start is not None:
        beta0 = np.r_[start["intercept"] + np.asarray(start["coef"]) @ mean, np.asarray(start["coef"]) * scale]
        sigma0 = float(start["sigma"])
    else:
        beta0, *_ = np.linalg.lstsq(design[obs], z[obs], rcond=None)
        sigma0 = max(float(np.std(z[obs] - design[obs] @ beta0)), 0.1 * spread)
    bounds = [(None, None)] + [(0.0, None) if s > 0 else (None, 0.0) if s < 0 else (None, None) for s in signs]
    lower = np.array([-np.inf if lo is None else lo for lo, _ in bounds])
    upper = np.array([np.inf if hi is None else hi for _, hi in bounds])
    beta0 = np.clip(beta0, lower, upper)
    # Olsen's reparametrisation: the negative log-likelihood is convex in (beta/sigma, 1/sigma).
    theta0 = np.append(beta0 / sigma0, 1.0 / sigma0)
    tau_bounds = (1e-8 / spread, 1e8 / spread)
    result = optimize.minimize(
        objective,
        theta0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds + [tau_bounds],
        options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10},
    )
    # L-BFGS-B often ends with an "ABNORMAL" line search at the optimum under these tight
    # tolerances; only an iteration limit or a gradient still far from zero is a failure.
    lo_all = np.append(lower, tau_bounds[0])
    hi_all = np.append(upper, tau_bounds[1])
    projected = np.where((result.x <= lo_all) & (result.jac > 0) | (result.x >= hi_all) & (result.jac < 0), 0.0, result.jac)
    if result.status == 1 or (not result.success and float(np.max(np.abs(projected))) > 1e-3 * max(1.0, abs(float(result.fun)))):
        warnings.warn(
            f"the censored regression did not converge ({result.message}); its coefficients may be off.", ConvergenceWarning, stacklevel=3
        )
    delta, tau = result.x[:-1], result.x[-1]
    beta_std = delta / tau
    coef = beta_std[1:] / scale
    intercept = beta_std[0] - coef @ mean
    return {"intercept": float(intercept), "coef": [float(c) for c in coef], "sigma": float(1.0 / tau)}


def _model_arrays(model: Mapping[str, Any]) -> tuple[float, np.ndarray, float]:
    return float(model["intercept"]), np.asarray(model["coef"], dtype=float), float(model["sigma"])


def _mu(model: Mapping[str, Any], x: np.ndarray) -> float:
    intercept, coef, _ = _model_arrays(model)
    return float(intercept + x @ coef)


def _conformal_scores(z: np.ndarray, mu: np.ndarray, sigma: np.ndarray, kind: np.ndarray, m: int) -> list[list[float]]:
    """Absolute held-out residuals ``|z - mu|``, one list per run.

    A run that reached the cutoff has one score. A censored run's residual is only bounded
    (``>= z - mu`` for ``kind`` +1, ``<=`` for -1); it gets ``m`` scores at the conditional
    quantiles ``(j - 0.5) / m`` of a normal residual given that bound (fold model's sigma),
    each counting ``1 / m`` of a run. Tails are computed in log space so they stay finite.
    """
    u = (np.arange(1, m + 1) - 0.5) / m
    scores: list[list[float]] = []
    for zi, mi, si, ki in zip(z, mu, sigma, kind):
        bound = float(zi - mi)
        if ki == 0:
            scores.append([abs(bound)])
            continue
        a = bound / si
        if ki > 0:  # upper-tail mass (1 - u) of the part above the bound
            draws = -si * special.ndtri_exp(np.log1p(-u) + special.log_ndtr(-a))
        else:  # lower-tail mass u of the part below the bound
            draws = si * special.ndtri_exp(np.log(u) + special.log_ndtr(a))
        scores.append([float(abs(d)) for d in draws])
    return scores


def _expanded_scores(scores: Sequence[Sequence[float]], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every run as ``m`` equally weighted scores (a run with one score repeats it), with the
    run each entry belongs to, so weighted conformal quantiles become plain order statistics."""
    values = np.concatenate([np.repeat(np.asarray(v, dtype=float), m // len(v)) for v in scores])
    owner = np.repeat(np.arange(len(scores)), m)
    return values, owner


def _conformal_ranks(n: int, level: float, m: int = 1) -> tuple[int, int]:
    """1-based ranks (lower, upper) of the jackknife+ / CV+ order statistics among ``n * m``
    values (``n`` runs of ``m`` equal-weight scores): upper = ceil(level (n + 1) m). Ranks
    below 1 or above ``n * m`` mean an infinite bound."""
    upper = math.ceil(level * (n + 1) * m - _EPS)
    return n * m + 1 - upper, upper


def _predict_z(version: CostModelVersion, matrix: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    state = version.state
    intercept, coef, sigma = _model_arrays(state["full"])
    point = intercept + matrix @ coef
    fold_i = np.array([_model_arrays(m)[0] for m in state["folds"]])
    fold_c = np.array([_model_arrays(m)[1] for m in state["folds"]]).reshape(len(state["folds"]), -1)
    fold_of_row = np.asarray(state["fold_of_row"], dtype=int)
    m = int(state["imputations"])
    scores, owner = _expanded_scores(state["scores"], m)
    mu_folds = fold_i[None, :] + matrix @ fold_c.T  # (rows, folds)
    mu_runs = mu_folds[:, fold_of_row[owner]]  # mu_{-k(i)}(x) for every score of every calibration run i
    lo_rank, hi_rank = _conformal_ranks(len(fold_of_row), level, m)
    if hi_rank > len(scores):
        upper = np.full(matrix.shape[0], np.inf)
        lower = np.full(matrix.shape[0], -np.inf)
    else:
        upper = np.sort(mu_runs + scores, axis=1)[:, hi_rank - 1]
        lower = np.sort(mu_runs - scores, axis=1)[:, lo_rank - 1]
    return point, lower, upper, sigma


def _loo_summary(
    epochs: np.ndarray,
    cens: np.ndarray,
    loo_mu: np.ndarray,
    scores: list[list[float]],
    fold_of_row: np.ndarray,
    level: float,
    offset: float,
    cv_kind: str,
) -> dict[str, Any]:
    """Held-out error of this version, from the same fold fits the intervals use.

    ``mdape_epochs``: median absolute percentage error of ``mu_{-k(i)}(x_i)`` over runs that
    reached the cutoff at a positive cost. ``coverage``: fraction of runs that reached the
    cutoff whose epochs lie in ``mu_{-k(i)}(x_i) +- q`` (mapped to epochs), ``q`` being the
    conformal quantile of the scores of runs outside i's fold (no nested refits).
    """
    pred = np.maximum(np.exp(loo_mu) - offset, 0.0)
    known = ~cens
    positive = known & (epochs > 0)
    ape = np.abs(pred[positive] - epochs[positive]) / epochs[positive]
    values, owner = _expanded_scores(scores, IMPUTATIONS)
    hits = []
    for i in np.flatnonzero(known):
        outside = fold_of_row[owner] != fold_of_row[i]
        _, rank = _conformal_ranks(int((fold_of_row != fold_of_row[i]).sum()), level, IMPUTATIONS)
        if rank > outside.sum():
            hits.append(True)
            continue
        q = np.sort(values[outside])[rank - 1]
        lower = _to_epochs(loo_mu[i] - q, offset)
        upper = _to_epochs(loo_mu[i] + q, offset)
        hits.append(bool(lower <= epochs[i] <= upper))
    return {
        "cv": cv_kind,
        "n": int(len(epochs)),
        "n_censored": int(cens.sum()),
        "n_zero_cost": int((known & (epochs == 0)).sum()),
        "mdape_epochs": float(np.median(ape)) if len(ape) else None,
        "coverage": float(np.mean(hits)) if hits else None,
        "level": float(level),
    }


def _folds(groups: Sequence[Any]) -> tuple[list[np.ndarray], str]:
    """Leave-one-out folds, or one fold per group (runs without a group are their own fold)."""
    n = len(groups)
    labelled = [g for g in groups if g is not None]
    distinct = list(dict.fromkeys(labelled))
    if len(distinct) < 2 and len(labelled) == n:
        return [np.array([i]) for i in range(n)], "leave-one-out (a single group)"
    if not labelled:
        return [np.array([i]) for i in range(n)], "leave-one-out"
    folds = [np.array([i for i, g in enumerate(groups) if g == label]) for label in distinct]
    folds += [np.array([i]) for i, g in enumerate(groups) if g is None]
    return folds, f"leave-one-group-out ({len(distinct)} groups)"


def min_points_needed(n_features: int, level: float = 0.90) -> int:
    """Runs with an exactly known cost (reached the cutoff, after some training unless
    zero-cost runs are fitted as observations) needed for ``n_features`` at this level.

    ``n_features + 3`` (an intercept, a scale and at least two degrees of freedom left over)
    and at least ``ceil(level / (1 - level))`` so that the jackknife+ interval is finite.
    """
    return max(n_features + 3, math.ceil(level / (1.0 - level) - _EPS))


#: Runs with an exact cost below which not even the prior can be fitted (a spread needs two).
MIN_EXACT_RUNS = 2


def _check_enough(n_features: int, kind: np.ndarray, level: float) -> int:
    """How many exact runs the full model misses (the prior stands in for them); refuses below 2."""
    need = min_points_needed(n_features, level)
    exact = int((kind == 0).sum())
    if exact < MIN_EXACT_RUNS:
        raise InputError(
            f"too few calibration runs to fit the cost model: need at least {MIN_EXACT_RUNS} runs whose exact cost is known "
            f"(and {need} for the full model: {n_features} features + 3, and >= {math.ceil(level / (1 - level) - _EPS)} "
            f"for a finite {level:.0%} interval), got {exact}; {int((kind > 0).sum())} hit the cap and {int((kind < 0).sum())} "
            "needed no training, which only bound the cost; add calibration runs."
        )
    return max(need - exact, 0)


# ----------------------------------------------------------------------------- input handling


def _build_rows(X: Any, y: Any, censored: Any, groups: Any, feature_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """Normalise fit input to ``{"x": {feature: value}, "epochs", "censored", "group", "meta"}`` rows."""
    if isinstance(X, Mapping):
        X = [X]
    if isinstance(X, np.ndarray) or (isinstance(X, Sequence) and X and not isinstance(X[0], Mapping)):
        array = np.asarray(X, dtype=float)
        if array.ndim != 2:
            raise InputError(f"X must be a list of dicts or a 2-D array, got an array of shape {array.shape}.")
        if feature_names is None or len(feature_names) != array.shape[1]:
            raise InputError(
                f"a 2-D array X needs feature_names with one name per column ({array.shape[1]} columns); pass feature_names=[...]."
            )
        source = [dict(zip(feature_names, map(float, line))) for line in array]
        dict_input = False
    elif isinstance(X, Sequence):
        source = [dict(r) for r in X]
        dict_input = True
    else:
        raise InputError(f"X must be a list of dicts or a 2-D array, got {type(X).__name__}.")
    n = len(source)
    if n == 0:
        raise InputError("no training runs were given; pass at least one calibration run.")

    if y is None:
        if not dict_input or any("epochs" not in r for r in source):
            raise InputError("no target was given: pass y (epochs to the cutoff) or rows with an 'epochs' value.")
        y = [r["epochs"] for r in source]
    y = _column(y, n, "y")
    if censored is None:
        censored = [_row_censored(r) for r in source] if dict_input else [False] * n
    elif isinstance(censored, str):
        censored = [bool(r.get(censored)) for r in source]
    cens = [bool(c) for c in _column(censored, n, "censored", numeric=False)]
    if isinstance(groups, str):
        if not dict_input:
            raise InputError(f"groups={groups!r} names a row key, which needs X as a list of dicts.")
        group_values = [r.get(groups) for r in source]
    elif groups is None:
        group_values = [None] * n
    else:
        group_values = list(_column(groups, n, "groups", numeric=False))

    rows = []
    for number, (record, target, c, g) in enumerate(zip(source, y, cens, group_values)):
        if not (_finite(target) and target >= 0):
            raise InputError(f"run {number} has epochs = {target!r}; epochs must be a finite number >= 0 (0 = cutoff already met).")
        # Every finite number is a candidate feature until the feature set is chosen.
        x = {k: float(v) for k, v in record.items() if _finite(v)}
        meta = {k: v for k, v in record.items() if k not in x and _json_scalar(v)}
        rows.append({"x": x, "epochs": float(target), "censored": c, "group": _json_group(g), "meta": meta})
    return rows


def _keep_features(rows: list[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Stored rows carry the model's features in ``x`` and everything else in ``meta``."""
    kept = []
    for row in rows:
        x = {n: row["x"][n] for n in names}
        meta = dict(row["meta"]) | {k: v for k, v in row["x"].items() if k not in x}
        kept.append(row | {"x": x, "meta": meta})
    return kept


def _feature_matrix(
    X: Any, names: Sequence[str], feature_names: Sequence[str] | None, version: int | None
) -> tuple[np.ndarray, list[Mapping[str, Any]]]:
    if isinstance(X, Mapping):
        X = [X]
    if isinstance(X, np.ndarray) or (isinstance(X, Sequence) and X and not isinstance(X[0], Mapping)):
        array = np.asarray(X, dtype=float)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2:
            raise InputError(f"X must be a list of dicts or a 2-D array, got an array of shape {array.shape}.")
        columns = list(feature_names) if feature_names is not None else list(names)
        if len(columns) != array.shape[1]:
            raise InputError(
                f"X has {array.shape[1]} columns but {len(columns)} feature names; pass feature_names matching the columns."
            )
        rows: list[Mapping[str, Any]] = [dict(zip(columns, map(float, line))) for line in array]
    elif isinstance(X, Sequence):
        rows = list(X)
    else:
        raise InputError(f"X must be a list of dicts or a 2-D array, got {type(X).__name__}.")
    if not rows:
        raise InputError("no input rows were given to predict for.")
    for number, row in enumerate(rows):
        _require_features(row, names, number, version)
    matrix = np.array([[float(row[n]) for n in names] for row in rows], dtype=float).reshape(len(rows), len(names))
    return matrix, rows


def _require_features(row: Mapping[str, Any], names: Sequence[str], number: int, version: int | None) -> None:
    missing = [n for n in names if not _finite(row.get(n))]
    if missing:
        which = f"cost model version {version} was fitted on" if version is not None else "the cost model uses"
        raise InputError(
            f"run {number} has no finite value for {missing}, which {which} {list(names)}; "
            "compute those features for it or fit a model without them."
        )


def _column(values: Any, n: int, name: str, numeric: bool = True) -> list[Any]:
    column = list(np.asarray(values, dtype=float)) if numeric else list(values)
    if len(column) != n:
        raise InputError(f"{name} has {len(column)} values but X has {n} rows; give one value per run.")
    return [float(v) for v in column] if numeric else column


def _per_row(value: Any, rows: Sequence[Mapping[str, Any]], key: str, m: int) -> list[float | None]:
    if value is None:
        return [float(r[key]) if _finite(r.get(key)) else None for r in rows]
    if np.ndim(value) == 0:
        return [float(value)] * m
    column = [float(v) for v in value]
    if len(column) != m:
        raise InputError(f"{key} has {len(column)} values for {m} rows; give a single value or one per row.")
    return column


def _row_censored(row: Mapping[str, Any]) -> bool:
    if "censored" in row and row["censored"] is not None:
        return bool(row["censored"])
    if "reached_cutoff" in row and row["reached_cutoff"] is not None:
        return not bool(row["reached_cutoff"])
    return False


# ----------------------------------------------------------------------------- small helpers


def _check_level(level: Any) -> None:
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise InputError(f"level must be a coverage strictly between 0 and 1 (e.g. 0.9), got {level!r}.")


def _to_epochs(z: float, offset: float) -> float:
    return max(math.exp(z) - offset, 0.0) if math.isfinite(z) else (math.inf if z > 0 else 0.0)


def _energy(samples: float | None, joules: float | None, epochs: tuple[float, ...]) -> tuple[float, ...] | None:
    if samples is None or joules is None:
        return None
    return tuple(e * samples * joules / JOULES_PER_KWH for e in epochs)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def _json_group(group: Any) -> Any:
    if group is None or isinstance(group, (str, int)):
        return group
    if isinstance(group, np.integer):
        return int(group)
    return str(group)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _json_number(value)


def _params_to_json(params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    if out.get("features") is not None:
        out["features"] = list(out["features"])
    if isinstance(out.get("monotone"), Mapping):
        out["monotone"] = dict(out["monotone"])
    return out
