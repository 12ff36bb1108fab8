"""Jackknife+ / CV+ intervals with censored runs as fractional conformal scores, and the held-out summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special

from shiftcost.costmodel.checks import CostModelInputError
from shiftcost.costmodel.history import CostModelVersion
from shiftcost.costmodel.tobit import _model_arrays

#: Conditional quantiles that stand in for one censored run's unknown conformal score.
IMPUTATIONS = 19
_EPS = 1e-9


def _conformal_scores(z: np.ndarray, mu: np.ndarray, sigma: np.ndarray, kind: np.ndarray, m: int) -> list[list[float]]:
    """Absolute held-out residuals ``|z - mu|``, one list per run.

    A run that reached the cutoff has one score. A capped run (``kind`` +1) would have
    needed more than it spent, so its residual is only known to be ``>= z - mu``; it gets
    ``m`` scores at the conditional quantiles ``(j - 0.5) / m`` of a normal residual given
    that bound (fold model's sigma), each counting ``1 / m`` of a run; tails are computed in
    log space so they stay finite. A run that needed no training (``kind`` -1) has one
    score, ``max(mu - z, 0)``: it is covered once the interval reaches down to zero epochs,
    and below zero there is no cost to cover. Imputing a normal residual below that bound
    instead would treat the model's fiction of a negative need as a miss to allow for and
    widen every interval.
    """
    u = (np.arange(1, m + 1) - 0.5) / m
    scores: list[list[float]] = []
    for zi, mi, si, ki in zip(z, mu, sigma, kind):
        bound = float(zi - mi)
        if ki == 0:
            scores.append([abs(bound)])
        elif ki < 0:
            scores.append([max(-bound, 0.0)])
        else:  # upper-tail mass (1 - u) of the part above the bound
            draws = -si * special.ndtri_exp(np.log1p(-u) + special.log_ndtr(-bound / si))
            scores.append([float(abs(d)) for d in draws])
    return scores


def _expanded_scores(scores: Sequence[Sequence[float]], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every run as ``m`` equally weighted scores (a run with one score repeats it), with the
    run each entry belongs to, so weighted conformal quantiles become plain order statistics."""
    values = np.concatenate([np.repeat(np.asarray(v, dtype=float), m // len(v)) for v in scores])
    owner = np.repeat(np.arange(len(scores)), m)
    return values, owner


def _conformal_ranks(n: int, level: float, m: int = 1) -> tuple[int, int]:
    """1-based ranks (lower, upper) of the jackknife+ / CV+ order statistics among ``n * m``
    values (``n`` runs of ``m`` equal-weight scores): upper = ceil(level (n + 1) m). Ranks
    below 1 or above ``n * m`` mean an infinite bound."""
    upper = math.ceil(level * (n + 1) * m - _EPS)
    return n * m + 1 - upper, upper


def _predict_z(
    version: CostModelVersion, matrix: np.ndarray, level: float, runs: Sequence[bool] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Point, CV+ lower and upper bound of ``z`` for each row of ``matrix``, and the full model's
    sigma. ``runs`` (a mask over calibration runs) restricts the conformal scores to those runs,
    each still scored by the fold model that left it out (Mondrian CV+ for one stratum)."""
    state = version.state
    intercept, coef, sigma = _model_arrays(state["full"])
    point = intercept + matrix @ coef
    fold_i = np.array([_model_arrays(m)[0] for m in state["folds"]])
    fold_c = np.array([_model_arrays(m)[1] for m in state["folds"]]).reshape(len(state["folds"]), -1)
    fold_of_row = np.asarray(state["fold_of_row"], dtype=int)
    m = int(state["imputations"])
    scores, owner = _expanded_scores(state["scores"], m)
    if runs is not None:
        kept = np.asarray(runs, dtype=bool)[owner]
        scores, owner = scores[kept], owner[kept]
    mu_folds = fold_i[None, :] + matrix @ fold_c.T  # (rows, folds)
    mu_runs = mu_folds[:, fold_of_row[owner]]  # mu_{-k(i)}(x) for every score of every calibration run i
    lo_rank, hi_rank = _conformal_ranks(len(owner) // m, level, m)
    if hi_rank > len(scores):
        upper = np.full(matrix.shape[0], np.inf)
        lower = np.full(matrix.shape[0], -np.inf)
    else:
        upper = np.sort(mu_runs + scores, axis=1)[:, hi_rank - 1]
        lower = np.sort(mu_runs - scores, axis=1)[:, lo_rank - 1]
    return point, lower, upper, sigma


def _loo_summary(
    epochs: np.ndarray,
    cens: np.ndarray,
    loo_mu: np.ndarray,
    scores: list[list[float]],
    fold_of_row: np.ndarray,
    level: float,
    offset: float,
    cv_kind: str,
) -> dict[str, Any]:
    """Held-out error of this version, from the same fold fits the intervals use.

    ``mdape_epochs``: median absolute percentage error of ``mu_{-k(i)}(x_i)`` over runs that
    reached the cutoff at a positive cost. ``coverage``: fraction of runs that reached the
    cutoff whose epochs lie in ``mu_{-k(i)}(x_i) +- q`` (mapped to epochs), ``q`` being the
    conformal quantile of the scores of runs outside i's fold (no nested refits).
    """
    pred = np.maximum(np.exp(loo_mu) - offset, 0.0)
    known = ~cens
    positive = known & (epochs > 0)
    ape = np.abs(pred[positive] - epochs[positive]) / epochs[positive]
    values, owner = _expanded_scores(scores, IMPUTATIONS)
    hits = []
    for i in np.flatnonzero(known):
        outside = fold_of_row[owner] != fold_of_row[i]
        _, rank = _conformal_ranks(int((fold_of_row != fold_of_row[i]).sum()), level, IMPUTATIONS)
        if rank > outside.sum():
            hits.append(True)
            continue
        q = np.sort(values[outside])[rank - 1]
        lower = _to_epochs(loo_mu[i] - q, offset)
        upper = _to_epochs(loo_mu[i] + q, offset)
        hits.append(bool(lower <= epochs[i] <= upper))
    return {
        "cv": cv_kind,
        "n": int(len(epochs)),
        "n_censored": int(cens.sum()),
        "n_zero_cost": int((known & (epochs == 0)).sum()),
        "mdape_epochs": float(np.median(ape)) if len(ape) else None,
        "coverage": float(np.mean(hits)) if hits else None,
        "level": float(level),
    }


def _folds(groups: Sequence[Any]) -> tuple[list[np.ndarray], str]:
    """Leave-one-out folds, or one fold per group (runs without a group are their own fold)."""
    n = len(groups)
    labelled = [g for g in groups if g is not None]
    distinct = list(dict.fromkeys(labelled))
    if len(distinct) < 2 and len(labelled) == n:
        return [np.array([i]) for i in range(n)], "leave-one-out (a single group)"
    if not labelled:
        return [np.array([i]) for i in range(n)], "leave-one-out"
    folds = [np.array([i for i, g in enumerate(groups) if g == label]) for label in distinct]
    folds += [np.array([i]) for i, g in enumerate(groups) if g is None]
    return folds, f"leave-one-group-out ({len(distinct)} groups)"


def min_points_needed(n_features: int, level: float = 0.90) -> int:
    """Runs with an exactly known cost (reached the cutoff, after some training unless
    zero-cost runs are fitted as observations) needed for ``n_features`` at this level.

    ``n_features + 3`` (an intercept, a scale and at least two degrees of freedom left over)
    and at least ``ceil(level / (1 - level))`` so that the jackknife+ interval is finite.
    """
    return max(n_features + 3, math.ceil(level / (1.0 - level) - _EPS))


#: Runs with an exact cost below which not even the prior can be fitted: each leave-one-out fold
#: that sizes the intervals fits a spread, which needs two, so three in all.
MIN_EXACT_RUNS = 3


def _check_enough(n_features: int, kind: np.ndarray, level: float) -> int:
    """How many exact runs the full model misses (the prior stands in for them); refuses below ``MIN_EXACT_RUNS``."""
    need = min_points_needed(n_features, level)
    exact = int((kind == 0).sum())
    if exact < MIN_EXACT_RUNS:
        raise CostModelInputError(
            f"too few calibration runs to fit the cost model: need at least {MIN_EXACT_RUNS} runs whose exact cost is known "
            f"(and {need} for the full model: {n_features} features + 3, and >= {math.ceil(level / (1 - level) - _EPS)} "
            f"for a finite {level:.0%} interval), got {exact}; {int((kind > 0).sum())} hit the cap and {int((kind < 0).sum())} "
            "needed no training, which only bound the cost; add calibration runs."
        )
    return max(need - exact, 0)


def _to_epochs(z: float, offset: float) -> float:
    return max(math.exp(z) - offset, 0.0) if math.isfinite(z) else (math.inf if z > 0 else 0.0)
