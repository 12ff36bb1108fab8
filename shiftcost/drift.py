"""Shift detection with Evidently 0.7: embeddings, image statistics and predictions.

Three groups of drift tests compare a batch with its model's reference, all on outputs
of the single forward pass the indices already make (no second pass):

* ``embeddings`` — the penultimate-layer embedding sample, through one of Evidently's
  embedding drift methods (``evidently.metrics.embeddings``): ``model`` (ROC AUC of a
  domain classifier telling reference from current), ``distance`` (distance between the
  mean embeddings), ``ratio`` (share of embedding components whose per-component
  Wasserstein test drifts) or ``mmd`` (unbiased squared maximum mean discrepancy, RBF
  kernel with the median heuristic). In Evidently 0.7 these return a *score* only; the
  verdict here is ``score > threshold`` and the threshold is stored with it. Defaults are
  Evidently's (model 0.55, ratio 0.2, mmd 0.015) except ``distance``, whose scale depends
  on the embedding space: its default threshold is the ``embeddings_quantile`` (0.95)
  quantile of the same distance between bootstrap resamples of the reference (sizes of
  the reference and current samples), i.e. calibrated on the reference itself.
  Each side is subsampled to ``max_embedding_rows`` rows first (seeded): MMD builds an
  ``(m+n)^2`` kernel matrix and the domain classifier's cost grows with the rows too.
* ``image_stats`` — one Evidently ``ValueDrift`` per statistic (brightness, contrast,
  sharpness, noise from :mod:`shiftcost.imagestats`) with Evidently's default test for
  the data (two-sample K-S p-value up to 1,000 reference rows, normed Wasserstein
  distance above) unless a method is set. The group drifts when the share of drifted
  columns reaches ``image_stats_share`` (Evidently's dataset-drift rule, default 0.5).
* ``predictions`` — Evidently ``ValueDrift`` on the predicted class as a categorical
  column. Above 1,000 reference rows Evidently's default (Jensen-Shannon distance,
  threshold 0.1). Up to 1,000 rows a chi-square test of homogeneity on the 2 x K table of
  class counts (``scipy.stats.chi2_contingency``, registered with Evidently as
  ``chisquare_2sample``, threshold 0.05): Evidently's default there, its ``chisquare``
  test, is a goodness-of-fit test that takes the reference frequencies as exact, which
  about doubles the statistic for equal sample sizes: two samples of one 10-class
  distribution (100 to 1,000 rows each) are flagged 49-59% of the time at a nominal 5%,
  against 4-5% for the homogeneity test.

The batch drifts when at least ``min_drifted_groups`` tested groups drift (default 1:
any). Groups missing on either side are not tested and say so.

Evidently renders its HTML report from the metrics' widgets; the embedding metric's own
widget needs a t-SNE of both samples, which takes many seconds, so by default the
embedding score is computed with the very same Evidently method object called directly
and shown as a summary widget; ``embedding_plot=True`` runs Evidently's
``EmbeddingsDrift`` metric (score identical) with its t-SNE plot instead.

Evidently and pandas are imported inside the functions that use them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shiftcost.drift_results import DriftInputs, DriftResult, DriftThresholds, FeatureResult, GroupResult, drifted_group_names
from shiftcost.drift_stattests import HOMOGENEITY_TEST, register_homogeneity_test, value_drift
from shiftcost.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_EMBEDDING_THRESHOLDS",
    "EMBEDDING_METHODS",
    "DriftInputs",
    "DriftResult",
    "DriftThresholds",
    "FeatureResult",
    "GROUPS",
    "GroupResult",
    "HOMOGENEITY_TEST",
    "detect_drift",
    "subsample_rows",
]

EmbeddingMethod = Literal["model", "distance", "ratio", "mmd"]
EMBEDDING_METHODS: tuple[str, ...] = ("model", "distance", "ratio", "mmd")
#: Evidently's own defaults; ``None`` means "calibrate on the reference" (see the module notes).
DEFAULT_EMBEDDING_THRESHOLDS: dict[str, float | None] = {"model": 0.55, "distance": None, "ratio": 0.2, "mmd": 0.015}
GROUPS: tuple[str, ...] = ("embeddings", "image_stats", "predictions")
PREDICTION_COLUMN = "predicted_class"

_METHOD_WORDS = {
    "model": "ROC AUC of a domain classifier (SGD logistic regression) separating reference from current embeddings",
    "distance": "Euclidean distance between the mean reference and mean current embeddings",
    "ratio": "share of embedding components whose Wasserstein test (normed, threshold 0.1) detects drift",
    "mmd": "unbiased squared MMD with an RBF kernel (median-distance bandwidth)",
}
_MIN_EMBEDDING_ROWS = 10
# Evidently switches from tests to distances above this many reference rows.
_SMALL_SAMPLE_ROWS = 1000
_BOOTSTRAP_ROUNDS = 100


# ----------------------------------------------------------------------------- entry point


def detect_drift(
    reference: DriftInputs,
    current: DriftInputs,
    *,
    embedding_method: EmbeddingMethod = "model",
    thresholds: DriftThresholds | Mapping[str, Any] | None = None,
    max_embedding_rows: int = 1000,
    seed: int = 0,
    embedding_plot: bool = False,
) -> DriftResult:
    """Test a batch (``current``) against its reference for drift in every group both provide.

    Deterministic for a given ``seed`` (subsampling and the distance bootstrap use it;
    Evidently's own methods are seeded internally). See the module notes for the tests.
    """
    started = time.perf_counter()
    if embedding_method not in EMBEDDING_METHODS:
        raise ConfigError(f"embedding drift method {embedding_method!r} is unknown; use one of {', '.join(EMBEDDING_METHODS)}.")
    if max_embedding_rows < _MIN_EMBEDDING_ROWS:
        raise ConfigError(f"max_embedding_rows is {max_embedding_rows}; allow at least {_MIN_EMBEDDING_ROWS} rows.")
    limits = DriftThresholds.coerce(thresholds)

    import evidently

    runners = {
        "embeddings": (_embeddings, lambda ref, cur: _embedding_group(ref, cur, embedding_method, limits, max_embedding_rows, seed, embedding_plot)),
        "image_stats": (_table, lambda ref, cur: _image_stats_group(ref, cur, limits)),
        "predictions": (_predictions, lambda ref, cur: _prediction_group(ref, cur, limits)),
    }
    groups: list[GroupResult] = []
    widgets: list[Any] = []
    tests: list[Any] = []
    for name, (parse, run) in runners.items():
        ref_value, cur_value = parse(getattr(reference, name), "reference"), parse(getattr(current, name), "current")
        if ref_value is None or cur_value is None:
            groups.append(_untested(name, ref_value is None, cur_value is None))
            continue
        group, group_widgets, group_tests = run(ref_value, cur_value)
        groups.append(group)
        widgets += group_widgets
        tests += group_tests

    tested = [group for group in groups if group.tested]
    if not tested:
        raise InputError("no drift test could run: give the reference and the batch at least one common input (embeddings, image statistics or predictions).")
    drifted = drifted_group_names(groups)
    verdict = len(drifted) >= limits.min_drifted_groups
    rule = f"drift when at least {limits.min_drifted_groups} of the {len(tested)} tested groups drift ({', '.join(g.name for g in tested)})"

    used = asdict(limits)
    used.update(embedding_method=embedding_method, max_embedding_rows=max_embedding_rows)
    for group in groups:
        if group.tested:
            used[f"{group.name}_resolved"] = group.threshold
    if groups[1].tested:
        used["image_stats_columns"] = {f.name: {"test": f.test, "threshold": f.threshold} for f in groups[1].features}
    html = _render_html(groups, widgets, tests, verdict, rule, drifted)
    return DriftResult(
        verdict=verdict,
        groups=tuple(groups),
        thresholds=used,
        rule=rule,
        seed=seed,
        seconds=time.perf_counter() - started,
        evidently_version=evidently.__version__,
        html=html,
    )


def subsample_rows(array: np.ndarray, max_rows: int, seed: int, stream: int = 0) -> np.ndarray:
    """At most ``max_rows`` rows of ``array`` drawn without replacement, in their original order.

    Seeded by ``(seed, stream)``, so the reference and current sides draw independently
    and reproducibly. Returns the array itself when it is small enough.
    """
    if array.shape[0] <= max_rows:
        return array
    rng = np.random.default_rng([seed, stream])
    keep = np.sort(rng.choice(array.shape[0], size=max_rows, replace=False))
    return array[keep]


# ----------------------------------------------------------------------------- groups


def _embedding_group(ref: np.ndarray, cur: np.ndarray, method: str, limits: DriftThresholds, max_rows: int, seed: int, plot: bool):
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod

    if ref.shape[1] != cur.shape[1]:
        raise InputError(f"the batch's embeddings have {cur.shape[1]} dimensions but the reference's have {ref.shape[1]}; compare embeddings from the same layer of the same model.")
    ref_s, cur_s = subsample_rows(ref, max_rows, seed, 0), subsample_rows(cur, max_rows, seed, 1)
    details: dict[str, Any] = {"reference_rows_given": ref.shape[0], "current_rows_given": cur.shape[0], "dimensions": ref.shape[1]}

    threshold = limits.embeddings if limits.embeddings is not None else DEFAULT_EMBEDDING_THRESHOLDS[method]
    if threshold is None:  # distance: calibrate on the reference
        threshold = _bootstrap_distance_threshold(ref_s, cur_s.shape[0], limits.embeddings_quantile, seed)
        details["threshold_source"] = f"bootstrap q{limits.embeddings_quantile:g} of the reference ({_BOOTSTRAP_ROUNDS} rounds)"
    else:
        details["threshold_source"] = "given" if limits.embeddings is not None else "Evidently default"

    # The Evidently method gets the same threshold, so its own flag agrees with our verdict.
    drift_method = {
        "model": lambda: ModelDriftMethod(threshold=threshold, bootstrap=False),
        "distance": lambda: DistanceDriftMethod(threshold=threshold, bootstrap=False),
        "ratio": lambda: RatioDriftMethod(threshold=threshold),
        "mmd": lambda: MMDDriftMethod(threshold=threshold, bootstrap=False),
    }[method]()
    columns = [f"e{i}" for i in range(ref.shape[1])]
    widgets: list[Any] = []
    tests: list[Any] = []
    if plot:
        score, widgets, tests = _embedding_report(ref_s, cur_s, columns, drift_method, threshold)
    else:
        score, _, _ = drift_method(_frame(cur_s, columns), _frame(ref_s, columns))
    score = float(score)
    drifted = score > threshold
    feature = FeatureResult("embeddings", f"{method}: {_METHOD_WORDS[method]}", score, float(threshold), drifted, "score > threshold")
    group = GroupResult("embeddings", True, drifted, f"Evidently EmbeddingsDrift, {method} method", score, float(threshold), (ref_s.shape[0], cur_s.shape[0]), (feature,), details)
    if not plot:
        widgets = [_summary_counter("Embeddings drift", feature, group.rows)]
    return group, widgets, tests


def _embedding_report(ref: np.ndarray, cur: np.ndarray, columns: list[str], drift_method: Any, threshold: float):
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.tests import lte

    from threadpoolctl import threadpool_limits

    definition = DataDefinition(numerical_columns=columns, embeddings={"embeddings": columns})
    metric = EmbeddingsDrift(embeddings_name="embeddings", drift_method=drift_method, tests=[lte(threshold)])
    # The widget's t-SNE busy-waits in OpenMP: on a shared, loaded host one thread is ~10x faster.
    with threadpool_limits(limits=1, user_api="openmp"):
        snapshot = Report([metric]).run(
            Dataset.from_pandas(_frame(cur, columns), data_definition=definition),
            Dataset.from_pandas(_frame(ref, columns), data_definition=definition),
        )
    (result,) = snapshot.metric_results.values()
    return result.value, result.get_widgets(), list(result.tests)


def _image_stats_group(ref: pd.DataFrame, cur: pd.DataFrame, limits: DriftThresholds):
    if list(ref.columns) != list(cur.columns):
        raise InputError(f"the batch's image statistics {list(cur.columns)} differ from the reference's {list(ref.columns)}; compute both with the same function.")
    features, widgets, tests = value_drift(ref, cur, list(ref.columns), [], limits.image_stats_method, limits.image_stats)
    share = sum(f.drifted for f in features) / len(features)
    drifted = share >= limits.image_stats_share
    methods = sorted({f.test for f in features})
    group = GroupResult(
        "image_stats", True, drifted, f"Evidently ValueDrift per column ({', '.join(methods)}); share of drifted columns",
        share, limits.image_stats_share, (len(ref), len(cur)), tuple(features), {"drifted_columns": [f.name for f in features if f.drifted]},
    )  # fmt: skip
    return group, widgets, tests


def _prediction_group(ref: np.ndarray, cur: np.ndarray, limits: DriftThresholds):
    import pandas as pd

    homogeneity = register_homogeneity_test()
    method = limits.predictions_method
    if method is None and len(ref) <= _SMALL_SAMPLE_ROWS:
        method = homogeneity
    ref_frame, cur_frame = pd.DataFrame({PREDICTION_COLUMN: ref}), pd.DataFrame({PREDICTION_COLUMN: cur})
    (feature,), widgets, tests = value_drift(ref_frame, cur_frame, [], [PREDICTION_COLUMN], method, limits.predictions)
    classes = np.union1d(ref, cur)
    details = {
        "classes": [int(c) for c in classes],
        "reference_counts": [int((ref == c).sum()) for c in classes],
        "current_counts": [int((cur == c).sum()) for c in classes],
    }
    group = GroupResult("predictions", True, feature.drifted, f"Evidently ValueDrift on the predicted class ({feature.test})", feature.score, feature.threshold, (len(ref), len(cur)), (feature,), details)
    return group, widgets, tests


def _untested(name: str, missing_reference: bool, missing_current: bool) -> GroupResult:
    missing = " and ".join(side for side, gone in (("reference", missing_reference), ("batch", missing_current)) if gone)
    return GroupResult(name, False, False, f"not tested: no {name.replace('_', ' ')} for the {missing}", None, None, (0, 0))


def _bootstrap_distance_threshold(ref: np.ndarray, n_current: int, quantile: float, seed: int) -> float:
    """Quantile of the mean-embedding distance between two bootstrap resamples of the reference.

    Resample sizes are the reference's and the current sample's, so the spread matches
    what two samples from the reference distribution would show. Multinomial counts turn
    each resample mean into one matrix product.
    """
    rng = np.random.default_rng([seed, 2])
    m = ref.shape[0]
    uniform = np.full(m, 1.0 / m)
    mean_a = rng.multinomial(m, uniform, size=_BOOTSTRAP_ROUNDS) @ ref / m
    mean_b = rng.multinomial(n_current, uniform, size=_BOOTSTRAP_ROUNDS) @ ref / n_current
    return float(np.quantile(np.linalg.norm(mean_a - mean_b, axis=1), quantile))


# ----------------------------------------------------------------------------- HTML


def _summary_counter(title: str, feature: FeatureResult, rows: tuple[int, int]) -> Any:
    from evidently.legacy.renderers.html_widgets import CounterData, counter

    state = "detected" if feature.drifted else "not detected"
    label = f"Drift {state}. Method: {feature.test}. Score {feature.score:.4g}, threshold {feature.threshold:.4g} (drift when {feature.drift_when}); rows {rows[0]} reference / {rows[1]} current."
    return counter(counters=[CounterData(label, title)], title="")


def _render_html(groups: Sequence[GroupResult], widgets: list[Any], tests: list[Any], verdict: bool, rule: str, drifted: list[str]) -> str:
    from evidently.core.metric_types import metric_tests_widget, render_widgets
    from evidently.core.report import metric_tests_stats
    from evidently.legacy.renderers.html_widgets import CounterData, counter, group_widget, table_data

    headline = f"Drift detected in {', '.join(drifted)}" if verdict else "No drift detected"
    header = counter(counters=[CounterData(f"{headline}; rule: {rule}.", "shiftcost drift verdict")], title="")
    rows = [
        [group.name, feature.name, feature.test, f"{feature.score:.4g}", f"{feature.threshold:.4g}", feature.drift_when, "yes" if feature.drifted else "no"]
        for group in groups
        for feature in group.features
    ]
    rows += [[group.name, "-", group.method, "", "", "", ""] for group in groups if not group.tested]
    table = table_data(column_names=["group", "feature", "test", "score", "threshold", "drift when", "drifted"], data=rows, title="Per-feature results")
    body = [group_widget(title="", widgets=[header, table, *widgets])]
    if tests:
        body += [metric_tests_stats(tests), metric_tests_widget(tests)]
    return render_widgets(body, as_iframe=False)


# ----------------------------------------------------------------------------- input checks


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _embeddings(value: Any, side: str) -> np.ndarray | None:
    if value is None:
        return None
    array = _to_numpy(value)
    if array.ndim != 2:
        raise InputError(f"the {side} embeddings have shape {array.shape}; pass an N x D matrix (one row per image).")
    if array.shape[0] < _MIN_EMBEDDING_ROWS:
        raise InputError(f"the {side} embeddings have {array.shape[0]} rows; embedding drift needs at least {_MIN_EMBEDDING_ROWS}.")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise InputError(f"the {side} embeddings contain non-numeric, NaN or infinite values; check the model's outputs.")
    return array.astype(np.float64, copy=False)


def _table(value: Any, side: str) -> pd.DataFrame | None:
    if value is None:
        return None
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        frame = value.copy()
    else:
        columns = {str(k): _to_numpy(v).reshape(-1) for k, v in dict(value).items()}
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"the {side} image statistics have columns of different lengths {lengths}; give one value per image in every column.")
        frame = pd.DataFrame(columns)
    frame.columns = [str(c) for c in frame.columns]
    if frame.shape[1] == 0 or len(frame) < 2:
        raise InputError(f"the {side} image statistics have {frame.shape[1]} columns and {len(frame)} rows; give at least one column and two images.")
    values = frame.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"the {side} image statistics contain NaN or infinite values; check the images are finite and in [0, 1].")
    return frame.astype(np.float64)


def _predictions(value: Any, side: str) -> np.ndarray | None:
    if value is None:
        return None
    array = _to_numpy(value)
    if array.ndim == 2:  # scores or probabilities: the predicted class is the arg-max
        array = array.argmax(axis=1)
    if array.ndim != 1 or len(array) < 2:
        raise InputError(f"the {side} predictions have shape {array.shape}; pass one predicted class per image (at least two images).")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.mod(array, 1) == 0):
            raise InputError(f"the {side} predictions are not class indices (dtype {array.dtype}); pass integer classes or a score matrix.")
        array = array.astype(np.int64)
    return array


def _frame(array: np.ndarray, columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(array, columns=columns)
