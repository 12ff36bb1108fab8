"""When a probe pays for itself.

The index forecast (stage 0) is free; a probe costs a few steps. It can only change a
decision when the index-only interval *straddles* what the budget has left: if even the
upper bound fits, retraining goes ahead anyway; if even the lower bound does not, it is
deferred anyway. Within the straddle the probe is worth it when its own cost is a small
share of what it puts at stake (the budget left), so probing never eats the budget it is
meant to protect. How small is the user's call (``probe_max_share`` in the settings,
``retrain --probe-max-share``): on a model whose retrains are tens of steps the probe is a
large part of any one retrain, so a small share means it never runs there.
"""

from __future__ import annotations

from dataclasses import dataclass

from shiftcost.config import MAX_PROBE_SHARE
from shiftcost.forecast.forecaster import Interval

__all__ = ["MAX_PROBE_SHARE", "ProbeAdvice", "probe_pays"]


@dataclass(frozen=True)
class ProbeAdvice:
    probe: bool
    reason: str


def probe_pays(
    index_energy_kwh: Interval, budget_left_kwh: float, probe_energy_kwh: float, max_share: float = MAX_PROBE_SHARE
) -> ProbeAdvice:
    """Whether to run the probe before deciding, with the reason in one sentence."""
    if index_energy_kwh.high <= budget_left_kwh:
        return ProbeAdvice(False, "even the index forecast's upper bound fits the budget left; a probe cannot change the decision")
    if index_energy_kwh.low > budget_left_kwh:
        return ProbeAdvice(False, "even the index forecast's lower bound exceeds the budget left; a probe cannot change the decision")
    if probe_energy_kwh > max_share * budget_left_kwh:
        return ProbeAdvice(False, f"the probe would cost more than {100 * max_share:.3g}% of the budget left")
    return ProbeAdvice(
        True, f"the index forecast's interval straddles the budget left and the probe costs at most {100 * max_share:.3g}% of it"
    )
