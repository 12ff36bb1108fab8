"""From shift indices to predicted retraining cost: epochs, kWh and kg CO2e with intervals.

Method (chosen for 20-60 calibration runs, some of which never reach the cutoff):

* Target. ``z = log(epochs + epochs_offset)`` (``log1p`` with the default offset of one
  epoch), so a zero-cost retrain (the cutoff already met) is representable and errors are
  roughly relative for long runs. Point predictions are the model's median,
  ``max(exp(mu) - offset, 0)``.
* Censoring. A run stopped by its step/epoch cap only tells us ``epochs >= spent``. The
  fit is a Tobit model (censored Gaussian regression) on ``z``: runs that reached the
  cutoff contribute the normal density, capped runs the probability of exceeding what they
  spent. A run that needed no training at all is, by default, left-censored at zero: it
  shows only that the latent need is at most zero, so the many zero-cost runs of mild shifts
  do not drag the line down. The likelihood is maximised in Olsen's parametrisation
  (``delta = beta / sigma``, ``tau = 1 / sigma``), where it is concave, so L-BFGS-B with
  bounds finds the unique optimum. A ridge penalty ``alpha / 2 * ||delta||^2`` on
  standardised features keeps the fit stable with correlated indices and few runs; without
  censoring it is exactly ridge regression.
* Monotonicity. Coefficients of shift indices are bounded to be >= 0 (more shift never
  predicts less cost), the current model's accuracy on the new batch to be <= 0 and its
  mean loss >= 0 (further from the cutoff costs more). Prediction entropy is left free:
  overconfident wrong predictions under noise make its sign type-dependent. (A linear model
  with these bounds was compared with a free linear model and with isotonic regression on
  the fitted linear score; the bounded linear model was as good as the others on
  leave-one-type-out tests, and isotonic steps cannot extrapolate at all.)
* Intervals. Jackknife+ (Barber, Candès, Ramdas, Tibshirani 2021), or CV+ when groups
  (e.g. corruption types) are given, in which case the folds are the groups so the
  residuals measure the error of predicting an unseen kind of shift. A censored calibration
  run's residual is only bounded; it enters the conformal quantile as 19 equally weighted
  scores at the conditional quantiles of the fold model's residual given that bound (so a
  capped run is never a point at the cap, and its uncertainty widens the interval).
  Coverage is distribution-free when nothing is censored (the scheme then reduces exactly
  to jackknife+ / CV+) and rests on the Tobit model for the censored runs otherwise.
* Few runs: a prior, not a refusal. The full model needs :func:`min_points_needed` runs
  with an exactly known cost (``n_features + 3``, and ``ceil(level / (1 - level))`` for a
  finite interval: 9 at 90% with up to 6 features). With fewer (but at least 2), it is
  still fitted, shrunk toward the constant prior (the runs' mean log epochs, every index
  ignored): the ridge strength grows by one per missing run, so the prior stands in for the
  runs that are missing and fades as they come. Its intervals are conformal as always,
  which with so few runs makes the upper bound infinite (unknown); the version records
  ``state["prior_runs"]``, the number of runs the prior stood in for.
* Units. Interval bounds on epochs map to energy and emissions through the same monotone
  (linear) transform: ``kWh = epochs * samples * J_per_sample_epoch / 3.6e6`` and
  ``kg CO2e = kWh * carbon_intensity_kg_per_kwh``.

Every fit is kept as a :class:`CostModelVersion` (its training rows, parameters, fitted
state and leave-one-out error) in a :class:`CostModelHistory` that round-trips through
plain JSON, so a stored prediction can always be reproduced and explained.
"""

from __future__ import annotations

from shiftcost.costmodel.checks import CostModelInputError, CostModelNotFittedError
from shiftcost.costmodel.estimator import DEFAULT_SIGNS, JOULES_PER_KWH, CostModel, CostPrediction
from shiftcost.costmodel.group_out import GroupOutReport, estimate_joules_per_sample_epoch, leave_one_group_out
from shiftcost.costmodel.history import FORMAT, CostModelHistory, CostModelVersion
from shiftcost.costmodel.intervals import IMPUTATIONS, min_points_needed
from shiftcost.costmodel.tobit import MAX_ITERATIONS
from shiftcost.features import FREE_FEATURES, KNOWN_FEATURES, SHIFT_FEATURES, Feature

__all__ = [
    "DEFAULT_SIGNS",
    "FORMAT",
    "FREE_FEATURES",
    "IMPUTATIONS",
    "JOULES_PER_KWH",
    "KNOWN_FEATURES",
    "MAX_ITERATIONS",
    "SHIFT_FEATURES",
    "CostModel",
    "CostModelHistory",
    "CostModelInputError",
    "CostModelNotFittedError",
    "CostModelVersion",
    "CostPrediction",
    "Feature",
    "GroupOutReport",
    "estimate_joules_per_sample_epoch",
    "leave_one_group_out",
    "min_points_needed",
]
