"""Independent, deliberately plain implementations of the cost model's formulas.

Nothing here imports ``shiftcost.costmodel`` internals: the Tobit likelihood is written in
the textbook (beta, sigma) parametrisation with scipy.stats and minimised by a different
optimiser, conformal ranks use exact fractions, and order statistics use sorted lists.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy import optimize, stats


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return (X - mean) / scale, mean, scale


def ridge_closed_form(X: np.ndarray, z: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
    """Ridge on standardised features, intercept unpenalised; returns raw-scale (intercept, coef)."""
    Xs, mean, scale = standardise(X)
    D = np.column_stack([np.ones(len(z)), Xs])
    P = np.diag([0.0] + [alpha] * Xs.shape[1])
    beta = np.linalg.solve(D.T @ D + P, D.T @ z)
    coef = beta[1:] / scale
    return float(beta[0] - coef @ mean), coef


def nonneg_least_squares(X: np.ndarray, z: np.ndarray, signs: np.ndarray) -> tuple[float, np.ndarray]:
    """min ||z - b0 - X b||^2 with sign(b_j) fixed where signs != 0, via centring and scipy nnls.

    Free coefficients are split into a positive and a negative part.
    """
    Xc = X - X.mean(axis=0)
    zc = z - z.mean()
    columns, back = [], []
    for j, s in enumerate(signs):
        if s > 0:
            columns.append(Xc[:, j]); back.append((j, 1.0))
        elif s < 0:
            columns.append(-Xc[:, j]); back.append((j, -1.0))
        else:
            columns.append(Xc[:, j]); back.append((j, 1.0))
            columns.append(-Xc[:, j]); back.append((j, -1.0))
    solution, _ = optimize.nnls(np.column_stack(columns), zc)
    coef = np.zeros(X.shape[1])
    for value, (j, sign) in zip(solution, back):
        coef[j] += sign * value
    return float(z.mean() - X.mean(axis=0) @ coef), coef


def tobit_negloglik(params: np.ndarray, D: np.ndarray, z: np.ndarray, kind: np.ndarray, alpha: float) -> float:
    """Textbook censored-normal negative log-likelihood with ridge alpha/(2 sigma^2) ||beta[1:]||^2."""
    beta, sigma = params[:-1], math.exp(params[-1])
    mu = D @ beta
    value = 0.0
    for zi, mi, ki in zip(z, mu, kind):
        if ki == 0:
            value -= stats.norm.logpdf(zi, loc=mi, scale=sigma)
        elif ki > 0:
            value -= stats.norm.logsf(zi, loc=mi, scale=sigma)
        else:
            value -= stats.norm.logcdf(zi, loc=mi, scale=sigma)
    return value + alpha * float(beta[1:] @ beta[1:]) / (2 * sigma**2)


def tobit_reference(X: np.ndarray, z: np.ndarray, kind: np.ndarray, alpha: float) -> tuple[float, np.ndarray, float]:
    """Unconstrained penalised Tobit by Nelder-Mead then Powell polishing; raw-scale (b0, coef, sigma)."""
    Xs, mean, scale = standardise(X)
    D = np.column_stack([np.ones(len(z)), Xs])
    obs = kind == 0
    start, *_ = np.linalg.lstsq(D[obs], z[obs], rcond=None)
    x0 = np.r_[start, math.log(max(np.std(z[obs] - D[obs] @ start), 0.05))]
    fun = lambda p: tobit_negloglik(p, D, z, kind, alpha)  # noqa: E731
    res = optimize.minimize(fun, x0, method="Nelder-Mead", options={"maxiter": 40000, "maxfev": 40000, "xatol": 1e-10, "fatol": 1e-12})
    res = optimize.minimize(fun, res.x, method="Powell", options={"xtol": 1e-10, "ftol": 1e-13, "maxiter": 40000})
    beta, sigma = res.x[:-1], math.exp(res.x[-1])
    coef = beta[1:] / scale
    return float(beta[0] - coef @ mean), coef, sigma


def conformal_ranks(n: int, level: float) -> tuple[int, int]:
    """Exact 1-based ranks: upper = ceil(level (n+1)), lower = floor((1-level)(n+1))."""
    lv = Fraction(str(level))
    upper = math.ceil(lv * (n + 1))
    lower = math.floor((1 - lv) * (n + 1))
    return lower, upper


def kth_smallest(values, k: int) -> float:
    ordered = sorted(float(v) for v in values)
    if k < 1:
        return -math.inf
    if k > len(ordered):
        return math.inf
    return ordered[k - 1]


def jackknife_plus(mu_loo_at_x: list[float], residuals: list[float], level: float) -> tuple[float, float]:
    """Barber et al. (2021) jackknife+ interval from the leave-one-out predictions at x and
    the leave-one-out absolute residuals |z_i - mu_{-i}(x_i)|."""
    n = len(residuals)
    lower_rank, upper_rank = conformal_ranks(n, level)
    lower = kth_smallest([m - r for m, r in zip(mu_loo_at_x, residuals)], lower_rank)
    upper = kth_smallest([m + r for m, r in zip(mu_loo_at_x, residuals)], upper_rank)
    return lower, upper


def energy_kwh(epochs: float, samples: float, joules_per_sample_epoch: float) -> float:
    return epochs * samples * joules_per_sample_epoch / 3_600_000.0
