"""Input checks and normalisation for the cost model: rows, feature matrices, JSON-safe values."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.exceptions import DataConversionWarning, NotFittedError

from shiftcost.errors import InputError


class CostModelInputError(InputError, ValueError):
    """Unusable input to the cost model: the command line's one-sentence error, and the
    ``ValueError`` scikit-learn's estimator contract expects."""


class CostModelNotFittedError(InputError, NotFittedError):
    """Used before ``fit``: scikit-learn's ``NotFittedError`` and the command line's one-sentence error."""


def _array_columns(X: Any, feature_names: Sequence[str] | None) -> list[str] | None:
    """Column names of array input (``x0``, ``x1``, ... when unnamed); ``None`` for dict rows."""
    if isinstance(X, Mapping) or (isinstance(X, Sequence) and (not X or isinstance(X[0], Mapping))):
        return None
    X = _as_input(X)
    if np.ndim(X) == 2 and np.shape(X)[1] == 0:
        raise CostModelInputError(f"X has 0 feature(s) (shape={np.shape(X)}) while a minimum of 1 is required; give at least one index column.")
    if feature_names is not None:
        return list(feature_names)
    return [f"x{i}" for i in range(np.shape(X)[1])] if np.ndim(X) == 2 else None


def _as_input(X: Any) -> Any:
    """Dict rows and arrays as they are, other array-likes as arrays; sparse matrices refused."""
    if sparse.issparse(X):
        raise CostModelInputError("X is a sparse matrix, which the cost model does not support; pass a dense array or a list of dicts.")
    if not isinstance(X, (Mapping, Sequence, np.ndarray)) and hasattr(X, "__array__"):
        return np.asarray(X)
    return X


def _build_rows(X: Any, y: Any, censored: Any, groups: Any, feature_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """Normalise fit input to ``{"x": {feature: value}, "epochs", "censored", "group", "meta"}`` rows."""
    X = _as_input(X)
    if isinstance(X, Mapping):
        X = [X]
    if isinstance(X, np.ndarray) or (isinstance(X, Sequence) and X and not isinstance(X[0], Mapping)):
        array = np.asarray(X, dtype=float)
        if array.ndim != 2:
            raise CostModelInputError(f"X must be a list of dicts or a 2-D array, got an array of shape {array.shape}.")
        if feature_names is None:
            # scikit-learn's convention for unnamed columns; such features get no sign bounds.
            feature_names = [f"x{i}" for i in range(array.shape[1])]
        if len(feature_names) != array.shape[1]:
            raise CostModelInputError(
                f"X has {array.shape[1]} columns but {len(feature_names)} feature names; pass one name per column."
            )
        source = [dict(zip(feature_names, map(float, line))) for line in array]
        dict_input = False
    elif isinstance(X, Sequence):
        source = [dict(r) for r in X]
        dict_input = True
    else:
        raise CostModelInputError(f"X must be a list of dicts or a 2-D array, got {type(X).__name__}.")
    n = len(source)
    if n == 0:
        raise CostModelInputError("no training runs were given; pass at least one calibration run.")

    if y is None:
        if not dict_input or any("epochs" not in r for r in source):
            raise CostModelInputError("no target was given (CostModel requires y to be passed, but the target y is None): pass y (epochs to the cutoff) or rows with an 'epochs' value.")
        y = [r["epochs"] for r in source]
    y = _column(y, n, "y")
    if censored is None:
        censored = [_row_censored(r) for r in source] if dict_input else [False] * n
    elif isinstance(censored, str):
        censored = [bool(r.get(censored)) for r in source]
    cens = [bool(c) for c in _column(censored, n, "censored", numeric=False)]
    if isinstance(groups, str):
        if not dict_input:
            raise CostModelInputError(f"groups={groups!r} names a row key, which needs X as a list of dicts.")
        group_values = [r.get(groups) for r in source]
    elif groups is None:
        group_values = [None] * n
    else:
        group_values = list(_column(groups, n, "groups", numeric=False))

    rows = []
    for number, (record, target, c, g) in enumerate(zip(source, y, cens, group_values)):
        if not (_finite(target) and target >= 0):
            raise CostModelInputError(f"run {number} has epochs = {target!r}; epochs must be a finite number >= 0 (0 = cutoff already met).")
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
    X = _as_input(X)
    if isinstance(X, Mapping):
        X = [X]
    if isinstance(X, np.ndarray) or (isinstance(X, Sequence) and X and not isinstance(X[0], Mapping)):
        array = np.asarray(X, dtype=float)
        if array.ndim == 1:
            raise CostModelInputError(
                f"X is a 1-D array of {array.shape[0]} values; Reshape your data with X.reshape(1, -1) for one batch."
            )
        if array.ndim != 2:
            raise CostModelInputError(f"X must be a list of dicts or a 2-D array, got an array of shape {array.shape}.")
        columns = list(feature_names) if feature_names is not None else list(names)
        if len(columns) != array.shape[1]:
            raise CostModelInputError(
                f"X has {array.shape[1]} features, but CostModel is expecting {len(columns)} features as input; "
                "pass feature_names matching the columns."
            )
        rows: list[Mapping[str, Any]] = [dict(zip(columns, map(float, line))) for line in array]
    elif isinstance(X, Sequence):
        rows = list(X)
    else:
        raise CostModelInputError(f"X must be a list of dicts or a 2-D array, got {type(X).__name__}.")
    if not rows:
        raise CostModelInputError("no input rows were given to predict for.")
    for number, row in enumerate(rows):
        _require_features(row, names, number, version)
    matrix = np.array([[float(row[n]) for n in names] for row in rows], dtype=float).reshape(len(rows), len(names))
    return matrix, rows


def _require_features(row: Mapping[str, Any], names: Sequence[str], number: int, version: int | None) -> None:
    missing = [n for n in names if not _finite(row.get(n))]
    if missing:
        which = f"cost model version {version} was fitted on" if version is not None else "the cost model uses"
        raise CostModelInputError(
            f"run {number} has no finite value for {missing} (missing, NaN or inf), which {which} {list(names)}; "
            "compute those features for it or fit a model without them."
        )


def _column(values: Any, n: int, name: str, numeric: bool = True) -> list[Any]:
    if numeric:
        array = np.asarray(values, dtype=float)
        if array.ndim == 2 and array.shape[1] == 1:
            # scikit-learn's own sentence opens the message: filters and its estimator checks match on it.
            warnings.warn(
                f"A column-vector {name} was passed when a 1d array was expected; it is read as a 1-D array of {array.shape[0]} values.",
                DataConversionWarning,
                stacklevel=4,
            )
            array = array.ravel()
    column = list(array) if numeric else list(values)
    if len(column) != n:
        raise CostModelInputError(f"{name} has {len(column)} values but X has {n} rows; give one value per run.")
    return [float(v) for v in column] if numeric else column


def _per_row(value: Any, rows: Sequence[Mapping[str, Any]], key: str, m: int) -> list[float | None]:
    if value is None:
        return [float(r[key]) if _finite(r.get(key)) else None for r in rows]
    if np.ndim(value) == 0:
        return [float(value)] * m
    column = [float(v) for v in value]
    if len(column) != m:
        raise CostModelInputError(f"{key} has {len(column)} values for {m} rows; give a single value or one per row.")
    return column


def _row_censored(row: Mapping[str, Any]) -> bool:
    if "censored" in row and row["censored"] is not None:
        return bool(row["censored"])
    if "reached_cutoff" in row and row["reached_cutoff"] is not None:
        return not bool(row["reached_cutoff"])
    return False


def _check_level(level: Any) -> None:
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise CostModelInputError(f"level must be a coverage strictly between 0 and 1 (e.g. 0.9), got {level!r}.")


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
    if out.get("offset_features") is not None:
        out["offset_features"] = list(out["offset_features"])
    if isinstance(out.get("monotone"), Mapping):
        out["monotone"] = dict(out["monotone"])
    return out
