"""The learning-curve fit against an independent brute-force fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shiftcost.forecast.curve import GAP_FLOOR, CurveFit, epochs_to_target, fit_curve
from shiftcost.forecast.probe import HORIZON_CAPS, probe_features


def slow_fit(t: list[float], acc: list[float], ceiling: float) -> tuple[float, float]:
    """Grid search, then a finer grid, over (log gap at 0, rate) minimising squared log-gap error."""
    gaps = [math.log(max(ceiling - a, GAP_FLOOR)) for a in acc]

    def sse(g0: float, k: float) -> float:
        return sum((g - (g0 - k * ti)) ** 2 for ti, g in zip(t, gaps))

    best = (0.0, 0.0)
    for g_range, k_range, n in (((-8.0, 2.0), (-5.0, 10.0), 201), (None, None, 201)):
        if g_range is None:
            g_range = (best[0] - 0.1, best[0] + 0.1)
            k_range = (best[1] - 0.15, best[1] + 0.15)
        grid = [(g, k) for g in np.linspace(*g_range, n) for k in np.linspace(*k_range, n)]
        best = min(grid, key=lambda p: sse(*p))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_squares_matches_a_brute_force_fit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = sorted(rng.uniform(0, 1.5, 9).tolist())
    ceiling = 0.97
    acc = [ceiling - 0.6 * math.exp(-1.7 * ti) + rng.normal(0, 0.02) for ti in t]
    fit = fit_curve(t, acc, ceiling)
    g0, k = slow_fit(t, acc, ceiling)
    assert fit.log_gap0 == pytest.approx(g0, abs=2e-3)
    assert fit.rate == pytest.approx(k, abs=3e-3)


def test_an_exact_curve_gives_back_its_crossing() -> None:
    ceiling, gap0, rate = 0.95, 0.5, 2.0
    t = [0.0, 0.1, 0.2, 0.3, 0.4]
    acc = [ceiling - gap0 * math.exp(-rate * ti) for ti in t]
    fit = fit_curve(t, acc, ceiling)
    assert fit.rate == pytest.approx(rate) and fit.log_gap0 == pytest.approx(math.log(gap0))
    target = ceiling - 0.03
    assert epochs_to_target(fit, target) == pytest.approx(math.log(gap0 / 0.03) / rate)
    assert fit.accuracy(epochs_to_target(fit, target)) == pytest.approx(target)


def test_no_progress_never_crosses_and_a_met_target_costs_nothing() -> None:
    flat = fit_curve([0.0, 0.5, 1.0], [0.5, 0.5, 0.49], 0.95)
    assert flat.rate <= 0 and math.isinf(epochs_to_target(flat, 0.92))
    assert epochs_to_target(CurveFit(log_gap0=math.log(0.01), rate=1.0, ceiling=0.95, points=3), 0.92) == 0.0
    assert fit_curve([0.3], [0.4], 0.95).rate == 0.0


def test_the_probe_gap_is_what_the_last_three_evaluations_leave_to_the_target() -> None:
    epochs = [0.0, 0.1, 0.2, 0.3, 0.4]
    rising = probe_features(epochs, [0.50, 0.60, 0.70, 0.74, 0.78], [1.0] * 5, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert rising["probe_gap"] == pytest.approx(0.9 - (0.70 + 0.74 + 0.78) / 3)
    past = probe_features(epochs, [0.50, 0.80, 0.91, 0.92, 0.93], [1.0] * 5, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert past["probe_gap"] == pytest.approx(-0.02)
    # Just under the target on a flat curve: no crossing (the curve sits at its horizon), a small finite gap.
    flat = probe_features(epochs, [0.89] * 5, [1.0] * 5, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert flat["curve_log_epochs"] == pytest.approx(math.log1p(HORIZON_CAPS * 15.0))
    assert flat["probe_gap"] == pytest.approx(0.01)


def test_the_probe_cutoff_is_where_its_own_evaluations_met_the_rule_or_else_the_curve() -> None:
    epochs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    # The window's mean first reaches 0.9 at the fifth evaluation (0.88, 0.91, 0.92).
    met = probe_features(epochs, [0.5, 0.7, 0.88, 0.91, 0.92, 0.93], [1.0] * 6, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert met["cutoff_log_epochs"] == pytest.approx(math.log1p(0.4))
    rising = probe_features(epochs, [0.5, 0.6, 0.65, 0.7, 0.72, 0.74], [1.0] * 6, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert rising["cutoff_log_epochs"] == pytest.approx(rising["curve_log_epochs"]) and rising["cutoff_log_epochs"] > math.log1p(0.5)


def test_a_probe_that_starts_at_the_target_has_crossed_at_once_whatever_its_steps_do() -> None:
    epochs = [0.0, 0.1, 0.2, 0.3, 0.4]
    # Its first steps push it below the target and the fitted curve never climbs back.
    dipping = probe_features(epochs, [0.91, 0.85, 0.84, 0.83, 0.84], [1.0] * 5, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert math.isinf(epochs_to_target(fit_curve(epochs, [0.91, 0.85, 0.84, 0.83, 0.84], 0.93), 0.9))
    assert dipping["curve_log_epochs"] == 0.0 and dipping["cutoff_log_epochs"] == 0.0
    just_under = probe_features(epochs, [0.899, 0.85, 0.84, 0.83, 0.84], [1.0] * 5, target=0.9, ceiling=0.93, cap_epochs=15.0)
    assert just_under["curve_log_epochs"] == pytest.approx(math.log1p(HORIZON_CAPS * 15.0))
