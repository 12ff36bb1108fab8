"""When a probe pays for itself.

The index forecast (stage 0) is free; a probe costs a few steps. It can only change a
decision when the index-only interval *straddles* what the budget has left: if even the
upper bound fits, retraining goes ahead anyway; if even the lower bound does not, it is
deferred anyway. Within the straddle the probe is worth it when its own cost is a small
share of what it puts at stake (the budget left), so probing never eats the budget it is
meant to protect.
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


def probe_pays(index_energy_kwh: Interval, budget_left_kwh: float, probe_energy_kwh: float) -> ProbeAdvice:
    """Whether to run the probe before deciding, with the reason in one sentence."""
    if index_energy_kwh.high <= budget_left_kwh:
        return ProbeAdvice(False, "even the index forecast's upper bound fits the budget left; a probe cannot change the decision")
    if index_energy_kwh.low > budget_left_kwh:
        return ProbeAdvice(False, "even the index forecast's lower bound exceeds the budget left; a probe cannot change the decision")
    if probe_energy_kwh > MAX_PROBE_SHARE * budget_left_kwh:
        return ProbeAdvice(False, f"the probe would cost more than {MAX_PROBE_SHARE:.0%} of the budget left")
    return ProbeAdvice(True, "the index forecast's interval straddles the budget left and the probe is cheap beside it")
