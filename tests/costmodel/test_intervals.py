"""Jackknife+ / CV+ intervals: against an explicit implementation, nominal coverage, monotonicity."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shiftcost.costmodel import CostModel

from . import slow_reference as ref
from .synth import linear_rows

NAMES = ("resque_dist", "mean_entropy")


def _xz(rows):
    X = np.array([[r[n] for n in NAMES] for r in rows])
    return X, np.log1p([r["epochs"] for r in rows])


def _explicit_interval(rows, tests, folds, alpha, level, runs=None):
    """CV+ (jackknife+ when every fold is one run) by refitting closed-form ridge per fold; with
    ``runs`` (flags), over those runs' residuals alone, each fold still fitted on every other run."""
    X, z = _xz(rows)
    Xt = np.array([[t[n] for n in NAMES] for t in tests])
    mu_at_test = np.zeros((len(tests), len(rows)))
    residuals = np.zeros(len(rows))
    for members in folds:
        keep = np.setdiff1d(np.arange(len(rows)), members)
        b0, coef = ref.ridge_closed_form(X[keep], z[keep], alpha)
        for i in members:
            residuals[i] = abs(z[i] - b0 - X[i] @ coef)
            mu_at_test[:, i] = b0 + Xt @ coef
    kept = [i for i in range(len(rows)) if runs is None or runs[i]]
    bounds = [ref.jackknife_plus(list(mu_at_test[j][kept]), list(residuals[kept]), level) for j in range(len(tests))]
    return [(max(math.expm1(lo), 0.0), max(math.expm1(hi), 0.0)) for lo, hi in bounds]


TESTS = [{"resque_dist": a, "mean_entropy": b} for a, b in [(0.1, 0.9), (0.5, 0.5), (0.95, 0.2), (1.3, 1.1)]]


@pytest.mark.parametrize("level", [0.9, 0.8, 0.5])
def test_jackknife_plus_matches_explicit_leave_one_out_refits(level):
    rows = linear_rows(seed=21, n=25, intercept=1.0)
    model = CostModel(monotone=False, alpha=0.3, level=level).fit(rows)
    expected = _explicit_interval(rows, TESTS, [[i] for i in range(len(rows))], 0.3, level)
    for pred, (lo, hi) in zip(model.predict_costs(TESTS), expected):
        assert pred.epochs_lower == pytest.approx(lo, rel=1e-6)
        assert pred.epochs_upper == pytest.approx(hi, rel=1e-6)
        assert pred.level == level
    assert model.loo_["cv"] == "leave-one-out"


def test_cv_plus_uses_groups_as_folds():
    rows = linear_rows(seed=22, n=24, intercept=1.0)
    groups = [f"g{i % 4}" for i in range(len(rows))]
    model = CostModel(monotone=False, alpha=0.3).fit(rows, groups=groups)
    folds = [[i for i, g in enumerate(groups) if g == label] for label in ("g0", "g1", "g2", "g3")]
    expected = _explicit_interval(rows, TESTS, folds, 0.3, 0.9)
    for pred, (lo, hi) in zip(model.predict_costs(TESTS), expected):
        assert pred.epochs_lower == pytest.approx(lo, rel=1e-6)
        assert pred.epochs_upper == pytest.approx(hi, rel=1e-6)
    assert model.loo_["cv"] == "leave-one-group-out (4 groups)"


def test_an_interval_sized_on_some_calibration_runs_uses_their_scores_alone():
    """Mondrian CV+: the stratum's residuals and fold predictions, the folds fitted on every run."""
    rows = linear_rows(seed=22, n=24, intercept=1.0)
    groups = [f"g{i % 4}" for i in range(len(rows))]
    model = CostModel(monotone=False, alpha=0.3).fit(rows, groups=groups)
    folds = [[i for i, g in enumerate(groups) if g == label] for label in ("g0", "g1", "g2", "g3")]
    stratum = [i % 3 != 0 for i in range(len(rows))]
    expected = _explicit_interval(rows, TESTS, folds, 0.3, 0.9, runs=stratum)
    pooled = model.predict_costs(TESTS)
    for pred, every, (lo, hi) in zip(model.predict_costs(TESTS, calibration_runs=stratum), pooled, expected):
        assert pred.epochs_lower == pytest.approx(lo, rel=1e-6)
        assert pred.epochs_upper == pytest.approx(hi, rel=1e-6)
        assert pred.epochs == every.epochs
    assert [p.epochs_upper for p in pooled] != pytest.approx([hi for _, hi in expected], rel=1e-6)
    with pytest.raises(ValueError, match="calibration_runs has 3 flags for the 24 runs"):
        model.predict_costs(TESTS, calibration_runs=[True] * 3)


def test_interval_level_can_change_at_prediction_time():
    rows = linear_rows(seed=23, n=30, intercept=1.0)
    model = CostModel(monotone=False, alpha=0.3).fit(rows)
    wide, narrow = model.predict_costs(TESTS, level=0.95), model.predict_costs(TESTS, level=0.5)
    expected = _explicit_interval(rows, TESTS, [[i] for i in range(len(rows))], 0.3, 0.5)
    for w, n, (lo, hi) in zip(wide, narrow, expected):
        assert w.epochs_lower <= n.epochs_lower <= n.epochs_upper <= w.epochs_upper
        assert (n.epochs_lower, n.epochs_upper) == (pytest.approx(lo, rel=1e-6), pytest.approx(hi, rel=1e-6))
    # 0.95 needs ceil(0.95 * 31) = 30 <= 30 runs: still finite; 0.99 does not.
    assert math.isfinite(wide[0].epochs_upper)
    assert math.isinf(model.predict_costs(TESTS[:1], level=0.99)[0].epochs_upper)
    assert model.predict_costs(TESTS[:1], level=0.99)[0].to_dict()["epochs_upper"] is None


def test_fold_models_equal_fresh_fits_and_censored_scores_are_truncated_normal_quantiles():
    rows = linear_rows(seed=24, n=20, cap_epochs=7.0)
    censored = [i for i, r in enumerate(rows) if not r["reached_cutoff"]]
    assert len(censored) >= 3
    model = CostModel(monotone=False, alpha=0.5).fit(rows)
    state = model.history_.latest.state
    m = state["imputations"]
    X, z = _xz(rows)
    for i in [0, *censored[:2]]:
        fresh = CostModel(monotone=False, alpha=0.5).fit(rows[:i] + rows[i + 1 :])
        fold = state["folds"][state["fold_of_row"][i]]
        np.testing.assert_allclose(fold["coef"], fresh.coef_, rtol=1e-5, atol=1e-6)
        assert fold["sigma"] == pytest.approx(fresh.sigma_, rel=1e-5)
        mu = fresh.intercept_ + X[i] @ fresh.coef_
        if i in censored:
            # Residual known only to exceed the bound: m quantiles of N(0, sigma) above it.
            bound = (z[i] - mu) / fresh.sigma_
            levels = [(j - 0.5) / m for j in range(1, m + 1)]
            expected = [abs(stats.truncnorm.ppf(u, bound, np.inf, loc=0.0, scale=fresh.sigma_)) for u in levels]
            assert min(stats.truncnorm.ppf(u, bound, np.inf) for u in levels) > bound
        else:
            expected = [abs(z[i] - mu)]
        np.testing.assert_allclose(state["scores"][i], expected, rtol=1e-4)


def test_a_run_that_needed_no_training_scores_how_far_its_held_out_prediction_lies_above_zero():
    """Its interval covers it once the lower end reaches zero epochs: no normal residual is
    imputed below that (a negative need is the model's fiction, not a cost to cover)."""
    rows = linear_rows(seed=4, n=30, intercept=-0.6)
    rows = [dict(r, epochs=0.0) if r["true_epochs"] < 0.05 else r for r in rows]
    zeros = [i for i, r in enumerate(rows) if r["epochs"] == 0]
    assert len(zeros) >= 3
    model = CostModel(monotone=False, alpha=0.5).fit(rows)
    state = model.history_.latest.state
    X, z = _xz(rows)
    above = []
    for i in zeros:
        fresh = CostModel(monotone=False, alpha=0.5).fit(rows[:i] + rows[i + 1 :])
        mu = fresh.intercept_ + X[i] @ fresh.coef_
        assert state["scores"][i] == pytest.approx([max(mu - z[i], 0.0)], abs=1e-5)
        above.append(mu > z[i])
    assert any(above) and not all(above)  # both branches of the max are walked


def test_censored_scores_enter_the_interval_as_fractional_runs():
    rows = linear_rows(seed=25, n=24, intercept=1.0, cap_epochs=9.0)
    model = CostModel(monotone=False, alpha=0.5).fit(rows)
    state = model.history_.latest.state
    m = state["imputations"]
    assert any(len(s) == m for s in state["scores"])
    folds = state["folds"]
    level = 0.9
    for x in TESTS:
        xv = np.array([x[n] for n in NAMES])
        lows, highs = [], []
        for i, scores in enumerate(state["scores"]):
            fold = folds[state["fold_of_row"][i]]
            mu = fold["intercept"] + xv @ np.array(fold["coef"])
            copies = m // len(scores)  # weight 1/m per entry: a one-score run counts m times
            for score in scores:
                lows += [mu - score] * copies
                highs += [mu + score] * copies
        upper_rank = math.ceil(Fraction(str(level)) * (len(rows) + 1) * m)
        expected_hi = ref.kth_smallest(highs, upper_rank)
        expected_lo = -ref.kth_smallest([-v for v in lows], upper_rank)
        pred = model.predict_costs([x])[0]
        assert pred.epochs_upper == pytest.approx(max(math.expm1(expected_hi), 0.0), rel=1e-12)
        assert pred.epochs_lower == pytest.approx(max(math.expm1(expected_lo), 0.0), rel=1e-12, abs=1e-12)


def _coverage_run(seed, n, cap_epochs, m=100):
    rows = linear_rows(seed=seed, n=n, cap_epochs=cap_epochs)
    fresh = linear_rows(seed=10_000 + seed, n=m)
    model = CostModel().fit(rows)
    preds = model.predict_costs([{k: t[k] for k in NAMES} for t in fresh])
    hits = [p.epochs_lower <= t["true_epochs"] <= p.epochs_upper for p, t in zip(preds, fresh)]
    widths = [math.log1p(p.epochs_upper) - math.log1p(max(p.epochs_lower, 0.0)) for p in preds]
    return float(np.mean(hits)), float(np.median(widths))


def _assert_near_nominal(per_seed, nominal=0.9):
    per_seed = np.asarray(per_seed)
    mean = per_seed.mean()
    se = per_seed.std(ddof=1) / math.sqrt(len(per_seed))
    # Four standard errors of the seed-to-seed spread (each seed: a fresh calibration set and
    # 100 fresh test runs), so a correct method fails this about once in 15,000 runs.
    assert abs(mean - nominal) <= 4 * se, (mean, se)


@pytest.mark.slow
def test_jackknife_plus_covers_at_the_nominal_rate_over_many_seeds():
    results = [_coverage_run(seed, n=30, cap_epochs=None) for seed in range(200)]
    _assert_near_nominal([c for c, _ in results])
    # Not absurdly wide: the oracle 90% interval of log(epochs + 1) is 2 * 1.645 * 0.25 wide.
    assert np.median([w for _, w in results]) < 1.3 * 2 * stats.norm.ppf(0.95) * 0.25


@pytest.mark.slow
def test_intervals_cover_the_latent_cost_when_a_fifth_of_the_runs_hit_the_cap():
    rows = linear_rows(seed=0, n=400, cap_epochs=8.0)
    share = np.mean([not r["reached_cutoff"] for r in rows])
    assert 0.12 < share < 0.3
    results = [_coverage_run(seed, n=30, cap_epochs=8.0) for seed in range(80)]
    _assert_near_nominal([c for c, _ in results])


# --------------------------------------------------------------------------- monotonicity

def _shift_rows():
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(30):
        r, inv, acc, ent = rng.uniform(0, 1, 4)
        z = 0.5 + 1.5 * r - 0.8 * inv + 1.0 * (1 - acc) + 0.6 * ent + rng.normal(0, 0.3)  # inv_ari "helps": constraint binds
        rows.append({"resque_dist": r, "inv_ari": inv, "accuracy": acc, "mean_entropy": ent, "epochs": max(math.expm1(z), 0.0)})
    return rows


MONOTONE_MODEL = CostModel().fit(_shift_rows(), groups=[i % 5 for i in range(30)])
unit = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    x=st.fixed_dictionaries({"resque_dist": unit, "inv_ari": unit, "accuracy": unit, "mean_entropy": unit}),
    feature=st.sampled_from(["resque_dist", "inv_ari", "accuracy"]),
    step=st.floats(0.0, 2.0, allow_nan=False),
)
def test_more_shift_never_predicts_less_cost(x, feature, step):
    moved = dict(x)
    moved[feature] += -step if feature == "accuracy" else step  # lower accuracy = further from the cutoff
    before, after = MONOTONE_MODEL.predict_costs([x, moved], samples=1000, joules_per_sample_epoch=2.0)
    for field in ("epochs", "epochs_lower", "epochs_upper", "energy_kwh", "energy_kwh_upper"):
        assert getattr(after, field) >= getattr(before, field), field


def test_the_monotone_model_really_is_constrained():
    free = CostModel(monotone=False).fit(_shift_rows())
    assert dict(zip(free.features_, free.coef_))["inv_ari"] < 0
    assert dict(zip(MONOTONE_MODEL.features_, MONOTONE_MODEL.coef_))["inv_ari"] == 0.0
    assert all(c >= 0 for c, s in zip(MONOTONE_MODEL.coef_, MONOTONE_MODEL.signs_) if s > 0)


def test_leave_one_out_summary_matches_explicit_refits():
    rows = linear_rows(seed=31, n=20, intercept=1.0)
    model = CostModel(monotone=False, alpha=0.3).fit(rows)
    X, z = _xz(rows)
    preds, residuals = [], []
    for i in range(len(rows)):
        keep = [j for j in range(len(rows)) if j != i]
        b0, coef = ref.ridge_closed_form(X[keep], z[keep], 0.3)
        preds.append(b0 + X[i] @ coef)
        residuals.append(abs(z[i] - preds[-1]))
    epochs = np.array([r["epochs"] for r in rows])
    ape = np.abs(np.expm1(preds) - epochs) / epochs
    assert model.loo_["mdape_epochs"] == pytest.approx(float(np.median(ape)), rel=1e-6)
    hits = []
    for i in range(len(rows)):
        others = residuals[:i] + residuals[i + 1 :]
        q = ref.kth_smallest(others, ref.conformal_ranks(len(others), 0.9)[1])
        hits.append(residuals[i] <= q)
    assert model.loo_["coverage"] == pytest.approx(float(np.mean(hits)))


def test_each_censored_run_enters_as_nineteen_truncated_normal_quantiles():
    """The imputation count is a design choice: 19 scores per capped run, each weighing 1/19.

    Everything here is computed outside the model's state: fold models are fresh fits
    without the run, its scores come from scipy's truncated normal, and the interval is a
    plain order statistic of the expanded scores.
    """
    imputations = 19
    level = 0.9
    rows = linear_rows(seed=26, n=22, intercept=1.0, cap_epochs=8.0)
    censored = {i for i, r in enumerate(rows) if not r["reached_cutoff"]}
    assert len(censored) >= 3
    model = CostModel(monotone=False, alpha=0.5, level=level).fit(rows)
    X, z = _xz(rows)
    quantiles = [(j - 0.5) / imputations for j in range(1, imputations + 1)]
    held_out = []  # (fold model's intercept, coef, scores) for every run
    for i in range(len(rows)):
        fresh = CostModel(monotone=False, alpha=0.5, level=level).fit(rows[:i] + rows[i + 1 :])
        mu = fresh.intercept_ + X[i] @ fresh.coef_
        if i in censored:
            bound = (z[i] - mu) / fresh.sigma_
            scores = [abs(stats.truncnorm.ppf(u, bound, np.inf, loc=0.0, scale=fresh.sigma_)) for u in quantiles]
        else:
            scores = [abs(z[i] - mu)] * imputations
        held_out.append((fresh.intercept_, fresh.coef_, scores))
    upper_rank = math.ceil(Fraction(str(level)) * (len(rows) + 1) * imputations)
    for x in TESTS:
        xv = np.array([x[n] for n in NAMES])
        highs = [b0 + xv @ coef + s for b0, coef, scores in held_out for s in scores]
        lows = [b0 + xv @ coef - s for b0, coef, scores in held_out for s in scores]
        pred = model.predict_costs([x])[0]
        assert pred.epochs_upper == pytest.approx(max(math.expm1(ref.kth_smallest(highs, upper_rank)), 0.0), rel=1e-4)
        assert pred.epochs_lower == pytest.approx(max(math.expm1(-ref.kth_smallest([-v for v in lows], upper_rank)), 0.0), rel=1e-4, abs=1e-9)
