"""What a retrain, and a probe before it, cost in kWh under the measurement protocol.

The pipeline prices its decisions and reservations with :class:`RetrainPrice`, and
``shiftcost retrain --budget-kwh`` prices the index forecast the same way before it decides
whether a probe pays (:func:`shiftcost.forecast.decide.probe_pays`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shiftcost.forecast import protocol

if TYPE_CHECKING:
    from shiftcost.costmodel import CostPrediction
    from shiftcost.energy import HostEnergyRate

__all__ = ["RetrainPrice"]


@dataclass(frozen=True)
class RetrainPrice:
    """kWh of a retrain that runs ``epochs`` under the measurement protocol.

    It trains ``epochs`` over the pool and evaluates the holdout at the protocol's cadence,
    at the host's rate (an evaluated sample weighs ``EVAL_SAMPLE_WEIGHT``, and the run pays
    its overhead once, as the rate refitted from measured retrains counts them), so a
    retrain that needs no training is still priced at its one evaluation and its overhead. It never runs past
    its epoch cap, so no bound is priced beyond the cap.
    """

    pool: int
    holdout: int
    batch_size: int
    rate: HostEnergyRate
    cap_epochs: float | None

    def kwh(self, epochs: float) -> float:
        run = max(float(epochs), 0.0) if self.cap_epochs is None else min(max(float(epochs), 0.0), self.cap_epochs)
        if not math.isfinite(run):
            return math.inf
        evaluations = protocol.evaluations(run, protocol.steps_per_epoch(self.pool, self.batch_size))
        return self.rate.kwh(run * self.pool, evaluations * self.holdout)

    def spent_kwh(self, samples_trained: float, evaluations: int) -> float:
        """What a run under way has cost after training on ``samples_trained`` samples and
        evaluating the holdout ``evaluations`` times (its overhead included)."""
        return self.rate.kwh(samples_trained, evaluations * self.holdout)

    def probe_kwh(self, probe_options: dict[str, Any]) -> float:
        """A probe run as ``probe_options`` (``Forecaster.probe_options()``) on this retrain's batch,
        priced at its full length: one that meets the cutoff stops sooner, never later. It
        evaluates the retrain's holdout, or at most ``max_holdout`` of it, once before its first
        step and after each."""
        steps = int(probe_options["steps"])
        evaluated = min(self.holdout, probe_options.get("max_holdout") or self.holdout)
        return self.rate.kwh(steps * int(probe_options["batch_size"]), (steps + 1) * evaluated)

    def priced(self, prediction: CostPrediction, epochs: tuple[float, float, float], intensity: float) -> CostPrediction:
        """``prediction`` with ``epochs`` (median, low, high) and their kWh and kg CO2e."""
        median, low, high = (self.kwh(e) for e in epochs)
        return dataclasses.replace(
            prediction,
            epochs=epochs[0], epochs_lower=epochs[1], epochs_upper=epochs[2],
            energy_kwh=median, energy_kwh_lower=low, energy_kwh_upper=high,
            emissions_kg=median * intensity, emissions_kg_lower=low * intensity, emissions_kg_upper=high * intensity,
        )  # fmt: skip
