"""CostModel against scikit-learn's estimator contract, and its optimiser's failure signal."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

import shiftcost.costmodel.tobit as tobit
from shiftcost.costmodel import CostModel

from .synth import linear_rows

#: Checks that only compare an error message's wording with scikit-learn's own; the cost
#: model refuses these inputs with a ValueError whose sentence names its own remedy.
WORDING_ONLY = {
    "check_complex_data": "refuses complex X (numpy's cast to float) with a message not in sklearn's wording",
    "check_fit2d_1sample": "one run is refused by the 'too few calibration runs' sentence, which says how many are needed",
}


@parametrize_with_checks([CostModel()], expected_failed_checks=lambda estimator: WORDING_ONLY)
def test_scikit_learn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_fit_starts_a_new_history_and_predict_returns_an_array():
    rows = linear_rows(0)
    model = CostModel().fit(rows).refit(linear_rows(1, n=5))
    assert len(model.history_) == 2
    model.fit(rows)
    assert len(model.history_) == 1 and model.version_ == 1
    points = model.predict(rows[:3])
    assert isinstance(points, np.ndarray) and points.shape == (3,)
    assert points.tolist() == [p.epochs for p in model.predict_costs(rows[:3])]


def test_an_ordinary_fit_raises_no_convergence_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        CostModel().fit(linear_rows(2, cap_epochs=4.0))


def test_an_optimiser_stopped_by_its_iteration_limit_warns(monkeypatch):
    # The real L-BFGS-B run, cut short: the fit is not at its optimum and must say so.
    monkeypatch.setattr(tobit, "MAX_ITERATIONS", 2)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        CostModel().fit(linear_rows(2, cap_epochs=4.0))
