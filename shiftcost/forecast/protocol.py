"""One measurement protocol for every retrain whose cost is measured or predicted.

Calibration sweeps, ``shiftcost retrain`` and the pipeline's retrain all measure "epochs
to the cutoff"; the figure only means the same thing when the held-out share that judges
the cutoff and the evaluation cadence are the same. Before, the sweep held out 0.3 and
evaluated every step while the command line held out 0.2 and evaluated every quarter
epoch, so a cost model calibrated on one was scored against the other.

The larger holdout (0.3) is kept: the cutoff decision is an accuracy on the held-out
split, whose binomial noise falls with its size (see the noise-floor figure of
``benchmarks/forecast_accuracy.py``). The cadence is a quarter epoch (at least one step),
which on the small batches calibration uses is every step anyway and on large batches
keeps the evaluations' own cost a bounded share of the run. A larger holdout does not make the
measurement quieter on these batches: with 0.5 the noise floor (leave-one-seed-out MdAPE of
epochs, one batch per built-in kind, 4 seeds, batches with a capped seed left out) went from 22%
to 26% on the digits CNN and from 34% to 39% on shufflenet_v2_x0_5, and more batches hit the cap,
since the training pool shrinks. The seed-to-seed spread comes from which samples are split
where, not from the holdout's binomial noise alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shiftcost.energy import EVAL_SAMPLE_WEIGHT  # noqa: F401 - part of the protocol

#: Share of the new batch held out to judge the cutoff.
HOLDOUT_FRACTION = 0.3
#: Evaluations per epoch (a quarter-epoch cadence).
EVALS_PER_EPOCH = 4
#: Epoch cap of every retrain unless set otherwise: calibration sweeps, ``shiftcost retrain`` and the
#: pipeline. Calibration's capped runs are censored here, so a forecast knows nothing past it: its
#: "not to converge" flag fires here, and a retrain allowed to run on would be priced beyond what any
#: calibration run measured.
MAX_EPOCHS = 15.0
#: Evaluations whose mean decides the cutoff (1: the latest alone). ``benchmarks/forecast_selection.py
#: --windows 1,2,3 --noise-seeds 4`` measures the noise floor (leave-one-seed-out MdAPE of epochs,
#: one batch per built-in kind, batches where a seed hit the cap left out) per window 1/2/3:
#: digits CNN 19/26/22%, shufflenet_v2_x0_5 39/34/34% (means 29.0/29.9/28.2%). The floors are
#: level within their own noise (an earlier count that let seeds capped alike score 0 had chosen
#: 3), so noise does not decide: 3 is kept because a run stopped on one lucky evaluation would
#: promote a model that has not recovered, and changing the protocol would make every stored
#: calibration measure something else than new retrains.
CUTOFF_WINDOW = 3


def cutoff_reached(history: Sequence[Any], target: float, window: int | None = None) -> bool:
    """Whether the run has reached the cutoff after its latest evaluation.

    ``history`` is every evaluation of the run so far, oldest first, as accuracies or
    points with an ``accuracy``. The cutoff is met when the mean of the last ``window``
    (default :data:`CUTOFF_WINDOW`) evaluations is at least ``target``: one held-out
    accuracy carries binomial noise, and a run stopped on a lucky evaluation records an
    epoch count that the next seed does not repeat. The latest evaluation must meet the
    target too, so a run is never stopped on its way down. Every retrain (calibration,
    ``shiftcost retrain``, the pipeline) decides through this one function.
    """
    size = CUTOFF_WINDOW if window is None else window
    values = [float(getattr(h, "accuracy", h)) for h in history]
    if not values:
        return False
    recent = values[-max(1, size):]
    return values[-1] >= target and sum(recent) / len(recent) >= target


def first_cutoff(history: Sequence[Any], target: float) -> int | None:
    """Index of the first evaluation in ``history`` after which :func:`cutoff_reached` holds
    (``None`` if none): where a run, or a probe, judged by the one rule stops."""
    return next((k for k in range(len(history)) if cutoff_reached(history[: k + 1], target)), None)


def eval_every(steps_per_epoch: int) -> int:
    """Optimizer steps between evaluations for a run with ``steps_per_epoch`` steps an epoch."""
    return max(1, steps_per_epoch // EVALS_PER_EPOCH)


def steps_per_epoch(pool_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``pool_samples`` (a trailing batch of one is dropped)."""
    full, rest = divmod(pool_samples, batch_size)
    return max(1, full + (1 if rest >= 2 else 0)) if pool_samples > 1 else 1


def split_sizes(batch_samples: int, holdout_fraction: float = HOLDOUT_FRACTION) -> tuple[int, int]:
    """(training pool, holdout) sizes of a batch under this protocol."""
    holdout = int(round(batch_samples * holdout_fraction))
    return batch_samples - holdout, holdout


def evaluations(epochs: float, steps_per_epoch_: int) -> int:
    """Evaluations a run of ``epochs`` makes: the initial one plus one per cadence interval."""
    steps = math.ceil(max(epochs, 0.0) * steps_per_epoch_ - 1e-9)
    return 1 + math.ceil(steps / eval_every(steps_per_epoch_))


def check_above_chance(reference_accuracy: float | None, num_classes: int | None, tolerance: float, what: str) -> None:
    """Refuse a base model whose target accuracy would not be above chance.

    Such a model (e.g. 0.097 on 10 classes) "recovers" at once and every retrain would be
    recorded as ``already_met``, which says nothing about cost.
    """
    from shiftcost.errors import InputError

    if reference_accuracy is None or not num_classes or num_classes < 2:
        return
    chance = 1.0 / num_classes
    if reference_accuracy - tolerance <= chance:
        raise InputError(
            f"the model scores {reference_accuracy:.3f} on {what}, no better than chance ({chance:.3f} for {num_classes} classes) "
            f"once the tolerance of {tolerance:g} is taken off, so there is nothing to recover; train the model first or check the labels."
        )
