"""Fine-tune a model until it recovers a target accuracy on new data, and measure the cost.

:func:`retrain_to_cutoff` is the executor behind every real retraining and every
calibration point: it fine-tunes a *copy* of the model on a labelled batch (optionally
replaying some reference data), evaluates on a held-out split of the new data every
``eval_every`` optimizer steps, and stops at the first evaluation whose accuracy reaches
the target, or at a step/epoch cap. Everything a cost model or an audit needs is recorded
in a :class:`RetrainResult`: steps and fractional epochs, the accuracy curve, gradient
norms, parameter change, wall time and CodeCarbon's energy/carbon figures.

:func:`probe_joules_per_sample_epoch` measures the energy of one training sample-epoch of
a model on the current hardware, so predicted epochs convert into kWh for any batch size.

Neither function touches the caller's model or global random state.

The package is split by concern: ``results`` (what a run reports), ``training`` (checks,
split, batches, optimizer, evaluation), ``loop`` (the run to the cutoff) and
``energy_probe``; every name is importable from here.
"""

from __future__ import annotations

from shiftcost.index.capture import resolve_device
from shiftcost.recipe import OPTIMIZERS, RetrainConfig
from shiftcost.retrain.energy_probe import probe_joules_per_sample_epoch
from shiftcost.retrain.loop import ProgressCallback, _stopped_status, _Tally, retrain_to_cutoff  # noqa: F401
from shiftcost.retrain.results import STATUSES, EvalPoint, ProbeResult, RetrainError, RetrainInterrupted, RetrainResult

# The building blocks stay importable from here, where the forecast probe and tests take them.
from shiftcost.retrain.training import (  # noqa: F401
    _batches, _check_logits, _check_xy, _evaluate, _holdout_split, _make_optimizer, _make_schedule,
    _param_change, _seeded, _train_mode, _trainable,
)

__all__ = [
    "EvalPoint",
    "RetrainResult",
    "RetrainError",
    "RetrainInterrupted",
    "ProbeResult",
    "retrain_to_cutoff",
    "probe_joules_per_sample_epoch",
    "resolve_device",
    "RetrainConfig",
    "ProgressCallback",
    "STATUSES",
    "OPTIMIZERS",
]
