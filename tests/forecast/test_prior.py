"""A prior, not a refusal: a cost model from fewer runs than the full model needs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from shiftcost.costmodel import CostModel, min_points_needed
from shiftcost.errors import InputError
from tests.costmodel.synth import linear_rows

FEATURES = ["resque_dist", "mean_entropy"]


def _ridge(rows: list[dict], alpha: float) -> tuple[float, np.ndarray]:
    """Ridge regression of log1p(epochs) on standardised features, back on the raw scale (scikit-learn)."""
    X = np.array([[r[f] for f in FEATURES] for r in rows])
    z = np.log1p(np.array([r["epochs"] for r in rows]))
    mean, scale = X.mean(axis=0), X.std(axis=0)
    fit = Ridge(alpha=alpha).fit((X - mean) / scale, z)
    coef = fit.coef_ / scale
    return float(fit.intercept_ - coef @ mean), coef


@pytest.mark.parametrize("n", [3, 5, 8])
def test_fewer_runs_than_the_full_model_needs_are_fitted_shrunk_toward_the_constant_prior(n: int) -> None:
    rows = [dict(r, reached_cutoff=True) for r in linear_rows(seed=3, n=n)]
    need = min_points_needed(len(FEATURES), 0.9)
    assert n < need == 9
    model = CostModel(features=FEATURES, monotone=False).fit(rows)
    assert model.history_.latest.state["prior_runs"] == need - n
    # Uncensored, the Tobit fit is ridge regression; the prior adds one unit of ridge per missing run.
    intercept, coef = _ridge(rows, alpha=1.0 + (need - n))
    assert model.intercept_ == pytest.approx(intercept, abs=1e-4)
    assert model.coef_ == pytest.approx(coef, abs=1e-4)
    unshrunk = _ridge(rows, alpha=1.0)[1]
    assert np.linalg.norm(model.coef_) < np.linalg.norm(unshrunk)
    # So few runs give no finite upper bound at 90%: the interval says how little is known.
    (prediction,) = model.predict_costs([{"resque_dist": 0.5, "mean_entropy": 0.5}])
    assert math.isinf(prediction.epochs_upper) and prediction.epochs >= 0


def test_the_prior_fades_once_the_full_model_has_its_runs() -> None:
    rows = [dict(r, reached_cutoff=True) for r in linear_rows(seed=3, n=9)]
    model = CostModel(features=FEATURES, monotone=False).fit(rows)
    assert model.history_.latest.state["prior_runs"] == 0
    intercept, coef = _ridge(rows, alpha=1.0)
    assert model.coef_ == pytest.approx(coef, abs=1e-4) and model.intercept_ == pytest.approx(intercept, abs=1e-4)


def test_below_three_exact_runs_even_the_prior_is_refused_in_one_sentence() -> None:
    rows = [dict(r, reached_cutoff=True) for r in linear_rows(seed=3, n=3)]
    capped = [dict(r, reached_cutoff=False) for r in rows[1:]]
    with pytest.raises(InputError, match=r"need at least 3 runs whose exact cost is known \(and 9 for the full model.*got 1; 2 hit the cap"):
        CostModel(features=FEATURES).fit(rows[:1] + capped)
