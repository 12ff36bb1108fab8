"""The penalised, sign-bounded censored Gaussian (Tobit) regression behind every cost-model fit."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, special
from sklearn.exceptions import ConvergenceWarning

#: L-BFGS-B iteration limit of one fit; reaching it is a ConvergenceWarning.
MAX_ITERATIONS = 2000


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
        options={"maxiter": MAX_ITERATIONS, "ftol": 1e-14, "gtol": 1e-10},
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


def _fit_tobit_with_offsets(
    X: np.ndarray,
    z: np.ndarray,
    kind: np.ndarray,
    signs: np.ndarray,
    alpha: float,
    offsets: Sequence[int] = (),
    start: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`_fit_tobit` with the coefficients of the columns ``offsets`` held at 1.

    Such a column is an offset in the GLM sense: the fit estimates only how far ``z`` departs
    from it. The returned model lists every column's coefficient, the held ones as 1, so it
    predicts like any other.
    """
    if not offsets:
        return _fit_tobit(X, z, kind, signs, alpha, start)
    free = [j for j in range(X.shape[1]) if j not in set(offsets)]
    if start is not None:
        start = dict(start) | {"coef": [start["coef"][j] for j in free]}
    fit = _fit_tobit(X[:, free], z - X[:, list(offsets)].sum(axis=1), kind, np.asarray(signs)[free], alpha, start)
    coef = np.ones(X.shape[1])
    coef[free] = fit["coef"]
    return fit | {"coef": [float(c) for c in coef]}


def _model_arrays(model: Mapping[str, Any]) -> tuple[float, np.ndarray, float]:
    return float(model["intercept"]), np.asarray(model["coef"], dtype=float), float(model["sigma"])


def _mu(model: Mapping[str, Any], x: np.ndarray) -> float:
    intercept, coef, _ = _model_arrays(model)
    return float(intercept + x @ coef)
