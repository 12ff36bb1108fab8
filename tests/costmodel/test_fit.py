"""The fit itself: against closed forms and a textbook Tobit, censoring, zero cost, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shiftcost.costmodel import CostModel, min_points_needed
from shiftcost.errors import InputError

from . import slow_reference as ref
from .synth import linear_rows


def _matrix(rows, names=("resque_dist", "mean_entropy")):
    return np.array([[r[n] for n in names] for r in rows])


def test_uncensored_fit_is_ridge_regression_on_log_epochs():
    rows = linear_rows(seed=3, n=30)
    model = CostModel(monotone=False, alpha=0.7).fit(rows)
    X = _matrix(rows)
    z = np.log1p([r["epochs"] for r in rows])
    intercept, coef = ref.ridge_closed_form(X, z, alpha=0.7)
    assert model.features_ == ["resque_dist", "mean_entropy"]
    np.testing.assert_allclose(model.coef_, coef, rtol=1e-6, atol=1e-8)
    assert model.intercept_ == pytest.approx(intercept, rel=1e-6, abs=1e-8)
    # The penalised MLE of sigma^2 is (RSS + alpha * ||beta_standardised||^2) / n.
    Xs, _, scale = ref.standardise(X)
    rss = float(np.sum((z - intercept - X @ coef) ** 2))
    assert model.sigma_**2 == pytest.approx((rss + 0.7 * float(np.sum((coef * scale) ** 2))) / len(z), rel=1e-6)


def test_sign_constraint_binds_and_equals_nonnegative_least_squares():
    rows = linear_rows(seed=5, n=30, intercept=1.5, slopes=(-1.0, 1.5))  # more shift "cheaper": the constraint must bind
    assert min(r["epochs"] for r in rows) > 0
    X = _matrix(rows)
    z = np.log1p([r["epochs"] for r in rows])
    free = CostModel(monotone=False, alpha=0.0).fit(rows)
    assert free.coef_[0] < 0
    constrained = CostModel(monotone=True, alpha=0.0).fit(rows)
    intercept, coef = ref.nonneg_least_squares(X, z, np.array([1, 0]))
    assert constrained.coef_[0] == 0.0
    np.testing.assert_allclose(constrained.coef_, coef, atol=1e-7)
    assert constrained.intercept_ == pytest.approx(intercept, abs=1e-7)


def test_negative_sign_holds_accuracy_coefficient_at_or_below_zero():
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.5, 1.0, 25)
    epochs = np.exp(0.5 + 1.0 * acc + rng.normal(0, 0.1, 25)) - 1  # higher accuracy costlier: implausible
    model = CostModel(alpha=0.0).fit(acc[:, None], epochs, feature_names=["accuracy"])
    assert model.signs_ == [-1]
    assert model.coef_[0] == 0.0
    assert CostModel(alpha=0.0, monotone=False).fit(acc[:, None], epochs, feature_names=["accuracy"]).coef_[0] > 0


def test_censored_fit_matches_textbook_tobit_likelihood():
    rows = linear_rows(seed=11, n=35, cap_epochs=8.0)
    rows += [{"resque_dist": 0.05 * i, "mean_entropy": 0.1, "epochs": 0.0, "reached_cutoff": True} for i in range(4)]
    kinds = np.array([1 if not r["reached_cutoff"] else (-1 if r["epochs"] == 0 else 0) for r in rows])
    assert (kinds == 1).sum() >= 5 and (kinds == -1).sum() >= 4
    model = CostModel(monotone=False, alpha=0.5, zero_cost_censored=True).fit(rows)
    z = np.log1p([r["epochs"] for r in rows])
    intercept, coef, sigma = ref.tobit_reference(_matrix(rows), z, kinds, alpha=0.5)
    np.testing.assert_allclose(model.coef_, coef, rtol=1e-4, atol=1e-5)
    assert model.intercept_ == pytest.approx(intercept, abs=1e-5)
    assert model.sigma_ == pytest.approx(sigma, rel=1e-4)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_censored_runs_pull_predictions_up_towards_the_truth(seed):
    rows = linear_rows(seed=seed, n=40, slopes=(2.5, 0.0), noise=0.2, cap_epochs=6.0)
    n_censored = sum(not r["reached_cutoff"] for r in rows)
    assert 8 <= n_censored <= 25
    x_high = {"resque_dist": 0.95, "mean_entropy": 0.5}
    truth = math.exp(0.4 + 2.5 * 0.95) - 1.0  # median of the latent cost there

    params = dict(features=["resque_dist"], alpha=0.0)
    censored_fit = CostModel(**params).fit(rows).predict_costs([x_high])[0].epochs
    dropped = [r for r in rows if r["reached_cutoff"]]
    dropped_fit = CostModel(**params).fit(dropped).predict_costs([x_high])[0].epochs
    at_cap = [dict(r, reached_cutoff=True) for r in rows]
    at_cap_fit = CostModel(**params).fit(at_cap).predict_costs([x_high])[0].epochs

    assert censored_fit > dropped_fit and censored_fit > at_cap_fit
    assert abs(math.log(censored_fit / truth)) < abs(math.log(dropped_fit / truth))
    assert abs(math.log(censored_fit / truth)) < abs(math.log(at_cap_fit / truth))


def test_zero_cost_runs_fit_and_predict_zero_lower_bounds():
    rows = linear_rows(seed=4, n=30, intercept=-0.6)
    rows = [dict(r, epochs=0.0) if r["true_epochs"] < 0.05 else r for r in rows]
    assert any(r["epochs"] == 0 for r in rows)
    for zero_censored in (True, False):
        model = CostModel(zero_cost_censored=zero_censored).fit(rows)
        low = model.predict_costs([{"resque_dist": 0.0, "mean_entropy": 0.0}])[0]
        assert low.epochs >= 0 and low.epochs_lower == 0.0
    assert CostModel().fit(rows).loo_["n_zero_cost"] == sum(r["epochs"] == 0 for r in rows)


def test_too_few_points_names_how_many_are_needed_and_given():
    rows = linear_rows(seed=0, n=20)
    need = min_points_needed(2, 0.9)
    assert need == 9  # 2 features + 3 = 5, but a finite 90% jackknife+ interval needs 9
    censored = [dict(r, reached_cutoff=False) for r in rows[10:13]]
    # Fewer exact runs than the full model needs: fitted with a prior standing in for the missing ones.
    assert CostModel().fit(rows[:8] + censored).history_.latest.state["prior_runs"] == 1
    assert CostModel().fit(rows[:9] + censored).history_.latest.state["prior_runs"] == 0
    with pytest.raises(InputError, match=r"need at least 3 runs whose exact cost is known \(and 9 for the full model.*got 1; 3 hit the cap and 0 needed no training"):
        CostModel().fit(rows[:1] + censored)
    # Two are refused too: each leave-one-out fold of the intervals needs two for its spread.
    with pytest.raises(InputError, match=r"need at least 3 runs whose exact cost is known .*got 2; 3 hit the cap"):
        CostModel().fit(rows[:2] + censored)
    assert CostModel().fit(rows[:3] + censored).history_.latest.state["prior_runs"] == 6
    six = [dict(r, inv_ari=0.1, layer_shift=0.2, preindex_p=0.3, accuracy=0.9) for r in rows]
    assert min_points_needed(6, 0.8) == 9  # here the features set the floor: 6 + 3
    assert CostModel(level=0.8).fit(six[:7]).history_.latest.state["prior_runs"] == 2
    # Zero-cost runs only bound the cost unless they are fitted as observations.
    zeros = [dict(r, epochs=0.0) for r in rows[9:12]]
    assert CostModel().fit(rows[:6] + zeros).history_.latest.state["prior_runs"] == 3
    assert CostModel(zero_cost_censored=False).fit(rows[:6] + zeros).history_.latest.state["prior_runs"] == 0


def test_features_default_to_known_ones_present_in_every_row():
    rows = linear_rows(seed=1, n=20)
    rows = [dict(r, inv_ari=0.1 * i, accuracy=0.9, custom=1.0) for i, r in enumerate(rows)]
    del rows[3]["inv_ari"]
    model = CostModel().fit(rows)
    assert model.features_ == ["resque_dist", "accuracy", "mean_entropy"]
    explicit = CostModel(features=["custom", "resque_dist"]).fit(rows)
    assert explicit.features_ == ["custom", "resque_dist"] and explicit.signs_ == [0, 1]


def test_prediction_needs_every_fitted_feature():
    rows = [dict(r, inv_ari=0.2) for r in linear_rows(seed=2, n=20)]
    model = CostModel().fit(rows)
    with pytest.raises(InputError, match=r"run 1 has no finite value for \['inv_ari'\].*version 1"):
        model.predict_costs([{"resque_dist": 0.1, "inv_ari": 0.1, "mean_entropy": 0.1}, {"resque_dist": 0.1, "mean_entropy": 0.1}])
    with pytest.raises(InputError, match="no finite value"):
        model.predict_costs([{"resque_dist": 0.1, "inv_ari": float("nan"), "mean_entropy": 0.1}])
    with pytest.raises(InputError, match="X has 2 features, but CostModel is expecting 3"):
        model.predict_costs(np.zeros((1, 2)))
    by_array = model.predict_costs(np.array([[0.3, 0.2, 0.4]]), feature_names=["mean_entropy", "inv_ari", "resque_dist"])[0]
    by_dict = model.predict_costs([{"resque_dist": 0.4, "inv_ari": 0.2, "mean_entropy": 0.3, "extra": "ignored"}])[0]
    assert by_array == by_dict


def test_array_input_names_its_columns_and_needs_y():
    X = np.random.default_rng(0).uniform(size=(15, 2))
    y = np.exp(X @ [1.0, 0.5]) - 1
    unnamed = CostModel().fit(X, y)
    assert unnamed.features_ == ["x0", "x1"] and unnamed.signs_ == [0, 0]
    with pytest.raises(InputError, match="X has 2 columns but 3 feature names"):
        CostModel().fit(X, y, feature_names=["a", "b", "c"])
    with pytest.raises(InputError, match="no target"):
        CostModel().fit(X, feature_names=["resque_dist", "accuracy"])
    with pytest.raises(InputError, match="y has 14 values but X has 15 rows"):
        CostModel().fit(X, y[:-1], feature_names=["resque_dist", "accuracy"])
    model = CostModel().fit(X, y, censored=np.zeros(15, bool), feature_names=["resque_dist", "accuracy"])
    assert model.n_train_ == 15 and model.n_censored_ == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"epochs": -1.0}, "epochs must be a finite number >= 0"),
        ({"epochs": float("inf")}, "epochs must be a finite number >= 0"),
    ],
)
def test_bad_targets_are_rejected(bad, message):
    rows = linear_rows(seed=0, n=15)
    rows[4] = dict(rows[4], **bad)
    with pytest.raises(InputError, match=message):
        CostModel().fit(rows)


@pytest.mark.parametrize("params", [{"level": 1.0}, {"level": 0}, {"alpha": -1.0}, {"epochs_offset": 0.0}, {"monotone": {"resque_dist": 2}}])
def test_bad_parameters_are_rejected(params):
    with pytest.raises(InputError):
        CostModel(**params).fit(linear_rows(seed=0, n=15))


def test_unfitted_model_says_so():
    with pytest.raises(InputError, match="not been fitted"):
        CostModel().predict_costs([{"resque_dist": 0.1}])


def _censored_rows():
    rows = linear_rows(seed=11, n=35, slopes=(1.5, 0.5), cap_epochs=6.0)
    rows += [{"resque_dist": 0.05 * i, "mean_entropy": 0.1, "epochs": 0.0, "reached_cutoff": True} for i in range(4)]
    kinds = np.array([1 if not r["reached_cutoff"] else (-1 if r["epochs"] == 0 else 0) for r in rows])
    assert (kinds == 1).sum() >= 3 and (kinds == -1).sum() >= 4
    return rows, kinds


def test_an_offset_feature_is_held_at_one_and_the_rest_is_the_textbook_tobit_of_what_departs_from_it():
    rows, kinds = _censored_rows()
    model = CostModel(monotone=False, alpha=0.5, offset_features=["resque_dist"]).fit(rows)
    X = _matrix(rows)
    z = np.log1p([r["epochs"] for r in rows])
    intercept, coef, sigma = ref.tobit_reference(X[:, 1:], z - X[:, 0], kinds, alpha=0.5)
    assert model.coef_[0] == 1.0
    assert model.coef_[1] == pytest.approx(coef[0], rel=1e-4, abs=1e-5)
    assert model.intercept_ == pytest.approx(intercept, abs=1e-5)
    assert model.sigma_ == pytest.approx(sigma, rel=1e-4)
    # A free fit of the same rows moves the slope away from 1: the offset is what holds it there.
    assert abs(CostModel(monotone=False, alpha=0.5).fit(rows).coef_[0] - 1.0) > 0.05


def test_an_offset_alone_fits_only_how_far_the_outcome_lies_from_it():
    rows, kinds = _censored_rows()
    model = CostModel(features=["resque_dist"], offset_features=["resque_dist"], alpha=0.5).fit(rows)
    x = np.array([r["resque_dist"] for r in rows])
    z = np.log1p([r["epochs"] for r in rows])
    ones = np.ones((len(z), 1))
    start = np.array([float(np.mean((z - x)[kinds == 0])), math.log(0.3)])
    from scipy import optimize

    res = optimize.minimize(lambda p: ref.tobit_negloglik(p, ones, z - x, kinds, 0.5), start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    assert model.coef_.tolist() == [1.0]
    assert model.intercept_ == pytest.approx(res.x[0], abs=1e-5)
    assert model.sigma_ == pytest.approx(math.exp(res.x[1]), rel=1e-4)
    saved = CostModel.from_json(model.to_json())
    assert saved.offset_features == ["resque_dist"]
    probe = [{"resque_dist": 0.3}, {"resque_dist": 0.9}]
    assert [p.to_dict() for p in saved.predict_costs(probe)] == [p.to_dict() for p in model.predict_costs(probe)]
    refitted = saved.refit([{"resque_dist": 0.5, "epochs": 2.0, "reached_cutoff": True}])
    assert refitted.coef_.tolist() == [1.0]


def test_an_offset_that_is_not_a_feature_is_refused():
    with pytest.raises(InputError, match=r"offset_features \['mean_loss'\] are not among the features"):
        CostModel(features=["resque_dist"], offset_features=["mean_loss"]).fit(linear_rows(seed=0, n=15))
