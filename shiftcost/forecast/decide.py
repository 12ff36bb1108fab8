"""When a probe pays for itself.

The index forecast (stage 0) is free; a probe costs a few steps. It can change a decision
in two cases. When the index forecast says the retrain would not reach the cutoff within
the epoch cap, the batch would be skipped on that alone, and the indices measure how far
the data moved rather than how learnable the move is: a probe of the learning itself can
overturn it, budget or none. Otherwise only when the index-only interval *straddles* what
the budget has left: if even the upper bound fits, retraining goes ahead anyway; if even the
lower bound does not, it is deferred anyway. Either way the probe is worth it only when its
own cost is a small share of the budget left (when one applies), so probing never eats the
budget it is meant to protect.
"""

from __future__ import annotations

from dataclasses import dataclass

from shiftcost.forecast.forecaster import Interval

__all__ = ["ProbeAdvice", "probe_pays"]

#: The probe may cost at most this share of the budget left.
MAX_PROBE_SHARE = 0.05


@dataclass(frozen=True)
class ProbeAdvice:
    probe: bool
    reason: str


def probe_pays(
    index_energy_kwh: Interval, budget_left_kwh: float | None, probe_energy_kwh: float, *, not_converging: bool = False
) -> ProbeAdvice:
    """Whether to run the probe before deciding, with the reason in one sentence.

    ``budget_left_kwh`` is ``None`` when no budget limits kWh; ``not_converging`` is the
    index forecast's flag that the retrain would not reach the cutoff within the cap.
    """
    too_dear = budget_left_kwh is not None and probe_energy_kwh > MAX_PROBE_SHARE * budget_left_kwh
    dear = ProbeAdvice(False, f"the probe would cost more than {MAX_PROBE_SHARE:.0%} of the budget left")
    if not_converging:
        if too_dear:
            return dear
        return ProbeAdvice(
            True, "the index forecast says the retrain would not reach the cutoff within the epoch cap, which only a probe of the learning can overturn"
        )
    if budget_left_kwh is None:
        return ProbeAdvice(False, "no budget limits kWh and the index forecast expects the retrain to converge, so a probe cannot change the decision")
    if index_energy_kwh.high <= budget_left_kwh:
        return ProbeAdvice(False, "even the index forecast's upper bound fits the budget left; a probe cannot change the decision")
    if index_energy_kwh.low > budget_left_kwh:
        return ProbeAdvice(False, "even the index forecast's lower bound exceeds the budget left; a probe cannot change the decision")
    if too_dear:
        return dear
    return ProbeAdvice(True, "the index forecast's interval straddles the budget left and the probe is cheap beside it")
