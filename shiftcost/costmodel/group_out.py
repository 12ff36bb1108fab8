"""Leave-one-group-out evaluation: fit on the other corruption types, predict the held-out one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shiftcost.costmodel.checks import CostModelInputError, _finite, _json_number, _jsonable, _row_censored
from shiftcost.costmodel.estimator import JOULES_PER_KWH, CostModel, CostPrediction


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
        raise CostModelInputError(
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
    horizon_epochs: float | None = None,
    **model_params: Any,
) -> GroupOutReport:
    """Fit on all other groups (e.g. corruption types), predict the held-out group, repeat.

    With ``horizon_epochs`` every prediction is held there before it is scored
    (:meth:`CostPrediction.held_at`), as the forecasts a user is shown are.

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
        raise CostModelInputError(f"every run needs a {group_key!r} value for leave-one-group-out; some have none.")
    distinct = list(dict.fromkeys(labels))
    if len(distinct) < 2:
        raise CostModelInputError(f"leave-one-group-out needs at least 2 values of {group_key!r}, got {distinct}.")
    points: list[dict[str, Any]] = []
    for held_out in distinct:
        train = [r for r, g in zip(rows, labels) if g != held_out]
        test = [r for r, g in zip(rows, labels) if g == held_out]
        model = CostModel(level=level, **model_params)
        try:
            model.fit(train, groups=group_key if group_folds else None)
        except CostModelInputError as error:  # its counts are the fold's, not the whole sweep's: say which fold
            raise CostModelInputError(f"with {group_key} {held_out!r} left out, {error}") from None
        joules = joules_per_sample_epoch or estimate_joules_per_sample_epoch(train)
        preds = model.predict_costs(test, joules_per_sample_epoch=joules, carbon_intensity=None)
        if horizon_epochs is not None:
            preds = [pred.held_at(horizon_epochs) for pred in preds]
        for row, pred in zip(test, preds):
            points.append(_score_point(row, pred, group_key, joules))
    summary = _group_summary(points, group_key, level)
    summary["model_params"] = dict(model_params)
    summary["group_folds"] = group_folds
    summary["horizon_epochs"] = horizon_epochs
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
